"""The gateway's HTTP routes, one router per audience: ``openai`` (the OpenAI API and
/health), ``feedback`` (votes on served turns) and ``admin`` (adapters, training,
engines, metrics). ``deps`` holds what they share: the gateway of the app, key checks
and JSON bodies, as FastAPI dependencies. Each route calls the gateway and returns."""
