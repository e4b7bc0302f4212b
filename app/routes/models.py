"""`GET /v1/models`: the models HAIA offers."""

from __future__ import annotations

from sanic import Blueprint, HTTPResponse, Request
from sanic.response import json as json_response
from sanic_ext import openapi

from app.context import services
from app.openapi import errors, returns
from app.schemas import ModelCard, ModelList

bp = Blueprint("models")


@bp.get("/v1/models")
@openapi.summary("List the models HAIA offers")
@openapi.description(
    "The default model first, then `HAIA_MODELS`, the models every reachable upstream offers "
    "(asked at least every 30 s; an unreachable one is left out), and the `HAIA_ALIASES`."
)
@returns(200, ModelList, "The models")
@errors()
async def list_models(request: Request) -> HTTPResponse:
    catalog = services(request).catalog
    ids = await catalog.models()
    cards = [ModelCard(id=model_id, owned_by=catalog.owner(model_id)) for model_id in ids]
    return json_response(ModelList(data=cards).model_dump(mode="json"))
