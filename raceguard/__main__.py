from raceguard.process.prestart import main

main()
