from comfyfleet.cli import main

main()
