"""The console and HTTP API (CONTRACT.md section 7), served by `router run` from the router's own process.

A Starlette app on an in-process uvicorn server, on the router's event loop. `router run`
composes it as a service of the daemon (`router.engine.daemon.Service`): the engine never
imports this package.

Modules:
- `server`: `http_service(cfg)`, the service: binds `[http] listen`, writes `<data>/http.url`,
  serves until the router stops, then closes gracefully. uvicorn installs no signal handlers
  (the router owns SIGTERM/SIGINT) and writes no access log.
- `context`: `HttpContext` (what every route may use) and `route`, which makes a route.
- `app`: `build_app`, which builds the app from the route lists of `route_modules()`.
- `auth`: the token and session-cookie checks (`Auth`), the access each route needs, the
  middleware that enforces it; `login`: the login page, `/login` and `/logout`.
- `core`: /healthz, /readyz, /state, /exceptions/open, /metrics.

Extension point: a module adds routes by giving a function `routes(ctx: HttpContext) ->
list[BaseRoute]` and naming it once in `app.route_modules()`. Routes are ordinary Starlette
routes made with `context.route(path, endpoint, methods=[...], access=...)`; `access` says who
may call them (`auth.Access`):

- `"read"` (the default): with `[http] token` set, `Authorization: Bearer <token>` or the
  session cookie of the login page; else 401.
- `"ingest"`: `Authorization: Bearer <ingest_token>` (default: the token); the read token
  and the cookie are not enough.
- `"public"`: no check by the app: /healthz, /readyz, the login page, and routes that check
  their callers themselves (partner webhooks with a signature).

A path no route claims is "read". The context carries the open `Runtime` (`ctx.rt`: its
partitions, store, health, metrics), the NATS connection (`ctx.nc`), the config (`ctx.cfg`),
the auth checker (`ctx.auth`), and `ctx.stopping`, an event set when the server begins to
stop: a long-lived response (a server-sent-events stream) must end once it is set.
"""
