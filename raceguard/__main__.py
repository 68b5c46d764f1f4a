from raceguard.prestart import main

main()
