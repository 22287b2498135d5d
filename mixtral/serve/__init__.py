"""Generation and serving: engine.Generator (prefill + KV-cache decode), sampling, the generate CLI, the chat loop."""
