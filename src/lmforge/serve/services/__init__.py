"""What the routes call: completion, chat and tokenizer services over the engine (serve.engine_api)."""
