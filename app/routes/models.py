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
@returns(200, ModelList, "The models")
@errors()
async def list_models(request: Request) -> HTTPResponse:
    ids = await services(request).catalog.models()
    cards = [ModelCard(id=model_id, owned_by=model_id.partition(":")[0]) for model_id in ids]
    return json_response(ModelList(data=cards).model_dump(mode="json"))
