"""Planning: how the model is split into stages and where Ray places the holders."""
