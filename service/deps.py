"""What routes receive through FastAPI's dependencies: the app's state and the caller, typed.

The providers are coroutines although they never await: FastAPI runs a plain `def` dependency in its
thread pool, a thread hop per request and per dependency that the event loop and the device thread pay
for in CPU and in contention for the interpreter."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.edge.caller import Caller
from service.state import ServiceState


async def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.tiue  # set once, by create_app
    return state


async def get_caller(request: Request) -> Caller:
    return Caller.of(request.scope)


State = Annotated[ServiceState, Depends(get_state)]
CallerDep = Annotated[Caller, Depends(get_caller)]
