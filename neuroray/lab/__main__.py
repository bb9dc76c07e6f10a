from neuroray.cli.lab import main

main()
