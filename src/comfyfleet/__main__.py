from comfyfleet.cli.main import main

main()
