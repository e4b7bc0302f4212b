from app.main import main

if __name__ == "__main__":  # Sanic's worker processes import this module again: no re-run
    main()
