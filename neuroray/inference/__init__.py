"""Generation from a trained checkpoint: sampling, KV-cached sessions, and distributed inference holders.

Generation is one loop (:func:`~neuroray.inference.sessions.run_sessions`) over *sessions* and an
*engine*. A session is one prompt being continued: its token ids, how many of them the engine has
cached (the position its next chunk starts at) and its own seeded sampler. An engine turns a group
of sessions' uncached tokens into next-token logits. Two engines exist:

* :class:`~neuroray.inference.sessions.LocalEngine` - the whole model in this process with a KV cache
  (the reference);
* :class:`~neuroray.inference.engine.PipelineEngine` - the same model split over Ray stage holders
  (:class:`~neuroray.inference.holder.InferenceHolder`: Driver -> Workers -> Validator), each with its
  own per-session cache.

Sampling happens beside the session, not on a holder: a session's random stream then survives the
loss of any holder, and the pipeline samples exactly what one process would.

Modules: ``sampling`` (logits -> token), ``sessions`` (sessions, the local engine, the loop),
``loading`` (checkpoint, tokenizer, prompt), ``holder`` (the Ray inference holder), ``discovery``
(starting and finding holders), ``engine`` (routing sessions over holders), ``proofs`` (signing and
crediting inference proofs), ``pipeline`` (one prompt through holders: ``python -m neuroray.generate``).
"""
