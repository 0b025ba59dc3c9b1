"""The API's routes, one router per area; handlers take their services from `request.app.state`
(set by app.create_app)."""

from lmforge.serve.routes import admin, chat, completions, embeddings, heads, static, tokenize

ROUTERS = [completions.router, chat.router, embeddings.router, heads.router, tokenize.router, admin.router,
           static.router]
