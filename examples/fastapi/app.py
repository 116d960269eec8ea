"""The FastAPI app the proxy fronts in the deployment example and its end-to-end test.

Run it behind the proxy with uvicorn trusting the proxy's forwarded headers:

    uvicorn app:app --port 8001 --proxy-headers --forwarded-allow-ips=127.0.0.1
"""

import os

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect

app = FastAPI()

# Requests this process has served (the counter route itself excluded), so a test can
# tell whether a request reached the app or was answered by the proxy.
served = {"count": 0}


@app.middleware("http")
async def count_requests(request: Request, call_next):
    if request.url.path != "/count":
        served["count"] += 1
    return await call_next(request)


@app.get("/count")
async def count():
    return {"count": served["count"], "app": os.environ.get("APP_NAME", "app")}


@app.get("/whoami")
async def whoami(request: Request):
    return {
        "client": request.client.host if request.client else None,
        "scheme": request.url.scheme,
        "host": request.headers.get("host"),
        "url_for": str(request.url_for("whoami")),
        "app": os.environ.get("APP_NAME", "app"),
    }


@app.post("/items")
async def create_item(request: Request):
    body = await request.body()
    return {"received": len(body), "app": os.environ.get("APP_NAME", "app")}


@app.post("/auth/token")
async def token():
    return {"access_token": "example", "token_type": "bearer"}


@app.websocket("/ws/echo")
async def echo(websocket: WebSocket):
    await websocket.accept()
    try:
        while True:
            await websocket.send_text(await websocket.receive_text())
    except WebSocketDisconnect:
        pass
