from raceguard.cli import main

main(prog_name="raceguard")
