"""The HTTP frontend: a plain ASGI app over the shared-memory region (ARCHITECTURE.md §5).

Never imports torch or transformers. The server builds a `FrontendContext` and serves
`create_app(ctx)` under uvicorn (uvloop, httptools, lifespan on).
"""
