"""The OpenAI-compatible API: request/response models (`protocol`) and the handlers the HTTP
server mounts (`serving`, `serving_completions`, `serving_chat`)."""
