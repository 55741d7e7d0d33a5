"""What routes receive through FastAPI's dependencies: the app's state and the caller, typed."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.edge.caller import Caller
from service.state import ServiceState


def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.tiue  # set once, by create_app
    return state


def get_caller(request: Request) -> Caller:
    return Caller.of(request.scope)


State = Annotated[ServiceState, Depends(get_state)]
CallerDep = Annotated[Caller, Depends(get_caller)]
