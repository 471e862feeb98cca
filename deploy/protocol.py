"""The HTTP protocol of the completion service, apart from Serve: authenticate, read, parse, answer.

Everything here is a function of headers and bytes (no Ray, no web framework), so the request rules test
in milliseconds. A bad request is a :class:`RequestError` carrying its HTTP status and a JSON body that
says what was wrong (``error``) and what to do about it (``hint``).

Multipart bodies are parsed with the standard library's MIME parser: the service needs no
``python-multipart``.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import math
import re
import uuid
from collections.abc import AsyncIterable
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

import numpy as np
from pydantic import SecretStr

from rag4dmc.actors.images import InputError, load_image, resize_for_model, validate_text
from rag4dmc.pipeline.schema import STAGES, STATUS_ABSTAINED, STATUS_COMPLETED, TASK_I2T, TASK_T2I

API_KEY_HEADER = "x-api-key"
JSON_TYPE = "application/json"
MULTIPART_TYPE = "multipart/form-data"
FIELDS = ("id", "image", "text", "min_confidence")
MAX_ID_CHARS = 256  # a client id is echoed back and seeds sampling generators; it is not a payload
DATA_URL_PREFIX = re.compile(r"^data:[\w.+-]+/[\w.+-]+;base64,", re.IGNORECASE)
DEFAULT_CHARSET = "utf-8"
HTTP_OK, HTTP_UNPROCESSABLE = 200, 422
USAGE = ('send JSON {"text": "..."} or {"image": "<base64>"}, or multipart/form-data with an "image" file '
         'part or a "text" field (optionally an "id", and a "min_confidence" in [0, 1])')


class RequestError(Exception):
    """A request the service refuses or fails: HTTP ``status``, what was wrong (``error``), what to do (``hint``),
    the response's extra ``headers`` (Retry-After) and, for a failure of the service itself, the ``error_id``
    its log line carries."""

    def __init__(self, status: int, error: str, hint: str, *, headers: dict[str, str] | None = None,
                 error_id: str | None = None):
        super().__init__(f"{status}: {error}")
        self.status, self.error, self.hint = status, error, hint
        self.headers, self.error_id = headers or {}, error_id

    def body(self) -> dict[str, str]:
        body = {"error": self.error, "hint": self.hint}
        if self.error_id is not None:
            body["error_id"] = self.error_id
        return body


def retry_after(seconds: float) -> dict[str, str]:
    """The Retry-After header: whole seconds (RFC 9110), rounded up so a client never retries too early."""
    return {"Retry-After": str(max(0, math.ceil(seconds)))}


def unavailable(what: str, retry_after_s: float) -> RequestError:
    """503 for a request the service cannot take now (a full queue, a deployment restarting)."""
    return RequestError(503, f"the service cannot take this request now: {what}",
                        f"retry after {max(0, math.ceil(retry_after_s))} s (the Retry-After header); if it "
                        "persists, add replicas (autoscaling max_replicas) or raise max_queued_requests",
                        headers=retry_after(retry_after_s))


def internal_error(exc: BaseException) -> RequestError:
    """500 for a request a deployment failed on, with a fresh error id (log it beside the traceback)."""
    error_id = uuid.uuid4().hex[:16]
    return RequestError(500, f"the service failed on this request ({type(exc).__name__}; error id {error_id})",
                        "retry (a crashed replica is restarted); if it persists, search the service's log for the "
                        "error id", error_id=error_id)


@dataclass(frozen=True)
class CompletionRequest:
    """One sample with exactly one modality; ``id`` is the client's, or a fresh UUID."""

    id: str
    image: bytes | None = None
    text: str | None = None
    min_confidence: float = 0.0  # below it the answer abstains (JobConfig.min_confidence, per request)

    @property
    def task(self) -> str:
        """``i2t`` (the image is given, the text is generated) or ``t2i``."""
        return TASK_I2T if self.image is not None else TASK_T2I


@dataclass(frozen=True)
class Query:
    """A request's observed modality, ready for the encoder: model-sized RGB pixels, or the text."""

    modality: str  # "image" or "text": the observed modality, as the knowledge base names it
    pixels: np.ndarray | None = None  # uint8 [S, S, 3] from ``resize_for_model``
    text: str | None = None


# ------------------------------------------------------------------------------------------- before the body


def check_api_key(sent: str | None, expected: SecretStr | None) -> None:
    """401 unless the key matches (compared in constant time); nothing to check when no key is configured."""
    if expected is None:
        return
    if not sent:
        raise RequestError(401, f"the {API_KEY_HEADER} header is missing; this service requires an API key",
                           f"send the service's API key in the {API_KEY_HEADER} header")
    if not hmac.compare_digest(sent.encode(), expected.get_secret_value().encode()):
        raise RequestError(401, f"the API key in the {API_KEY_HEADER} header is wrong",
                           "send the key the service was started with (rag4dmc serve --api-key, or api_key in "
                           "its config)")


def too_large(limit: int) -> RequestError:
    return RequestError(413, f"the request body is over the limit of {limit} bytes",
                        "send a smaller image (a base64 image in JSON takes 4/3 of its size; multipart sends "
                        "it as is) or raise max_upload_bytes in the service's config")


def check_declared_length(declared: str | None, limit: int) -> None:
    """413 at once when the Content-Length header announces a body over ``limit`` (before reading it)."""
    if declared is None:
        return
    try:
        length = int(declared)
    except ValueError:
        raise RequestError(400, f"the Content-Length header is not a number: {declared!r}",
                           "send a valid Content-Length (HTTP clients set it themselves)") from None
    if length > limit:
        raise too_large(limit)


async def read_body(chunks: AsyncIterable[bytes], limit: int) -> bytes:
    """The body, read chunk by chunk; 413 as soon as it grows over ``limit`` (whatever the headers said)."""
    body, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        body.append(chunk)
    return b"".join(body)


# ------------------------------------------------------------------------------------------------- parsing


def media_type(content_type: str | None) -> str:
    """``type/subtype`` of a Content-Type header, lower case, without parameters ("" if absent)."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def parse_request(content_type: str | None, body: bytes, *, max_text_chars: int) -> CompletionRequest:
    """The request in a JSON or multipart/form-data body; RequestError (400 or 415) saying what is wrong."""
    if not body:
        raise RequestError(400, "the request has no body", USAGE)
    kind = media_type(content_type)
    if kind == JSON_TYPE:
        fields = _json_fields(body)
    elif kind == MULTIPART_TYPE:
        fields = _multipart_fields(content_type or "", body)
    else:
        got = f"Content-Type {kind!r}" if kind else "no Content-Type header"
        raise RequestError(415, f"the request has {got}; expected {JSON_TYPE} or {MULTIPART_TYPE}", USAGE)
    return _request(fields, max_text_chars)


def _json_fields(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(400, f"the body is not valid JSON ({exc})", USAGE) from None
    if not isinstance(data, dict):
        raise RequestError(400, f"the JSON body is a {type(data).__name__}, not an object", USAGE)
    image = data.get("image")
    if image is not None:
        if not isinstance(image, str):
            raise RequestError(400, f"image must be a base64 string in JSON, got {type(image).__name__}",
                               "encode the image file's bytes as base64, or upload it as multipart/form-data")
        data = {**data, "image": _base64(image)}
    return data


def _base64(value: str) -> bytes:
    """The bytes of a base64 string (line breaks allowed) or of a ``data:<type>;base64,`` URL."""
    compact = "".join(DATA_URL_PREFIX.sub("", value.strip(), count=1).split())
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(400, f"image is not valid base64 ({exc})",
                           "encode the image file's bytes with standard base64 (RFC 4648), or upload the file "
                           "as multipart/form-data") from None


def _multipart_fields(content_type: str, body: bytes) -> dict[str, Any]:
    header = f"Content-Type: {content_type}\r\n\r\n".encode("latin-1", errors="replace")
    message = BytesParser(policy=HTTP).parsebytes(header + body)
    if not message.is_multipart() or message.defects:
        problem = "; ".join(type(d).__name__ for d in message.defects) or "no parts found"
        raise RequestError(400, f"the multipart/form-data body could not be parsed ({problem})",
                           "let the HTTP client build the body (e.g. curl -F image=@photo.png, requests' files=)")
    fields: dict[str, Any] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            raise RequestError(400, "a multipart part has no name in its Content-Disposition header",
                               'name each part: "image", "text" or "id"')
        if name in fields:
            raise RequestError(400, f"the multipart field {name!r} is given more than once", "send each field once")
        fields[name] = _part_value(name, part)
    return fields


def _part_value(name: str, part: EmailMessage) -> bytes | str:
    payload = part.get_payload(decode=True) or b""
    if name == "image":
        return payload
    charset = part.get_content_charset() or DEFAULT_CHARSET
    try:
        return payload.decode(charset)
    except (LookupError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"the multipart field {name!r} is not text in {charset} ({exc})",
                           f"send {name!r} as UTF-8 text") from None


def _present(value: Any) -> bool:
    """Given and not empty: an empty or whitespace value means the modality is missing, as in the job."""
    if value is None:
        return False
    return bool(value.strip()) if isinstance(value, str) else len(value) > 0


def _request(fields: dict[str, Any], max_text_chars: int) -> CompletionRequest:
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise RequestError(400, f"unknown field(s) {', '.join(map(repr, unknown))}",
                           f"the fields are {', '.join(map(repr, FIELDS))}: {USAGE}")
    image, text = fields.get("image"), fields.get("text")
    if text is not None and not isinstance(text, str):
        raise RequestError(400, f"text must be a string, got {type(text).__name__}", USAGE)
    has_image, has_text = _present(image), _present(text)
    if has_image and has_text:
        raise RequestError(400, "the request has both an image and a text: there is nothing to complete",
                           "send only the modality you have; the service generates the other one")
    if not has_image and not has_text:
        raise RequestError(400, "the request has neither an image nor a non-empty text: nothing to complete from",
                           USAGE)
    if has_text:
        text = validate_text(text)
        if len(text) > max_text_chars:
            raise RequestError(400, f"text has {len(text)} characters, over the limit of {max_text_chars}",
                               "send a shorter text, or raise max_text_chars in the service's config")
    return CompletionRequest(id=_request_id(fields.get("id")), image=bytes(image) if has_image else None,
                             text=text if has_text else None,
                             min_confidence=_min_confidence(fields.get("min_confidence")))


def _min_confidence(value: Any) -> float:
    """A request's min_confidence: a number in [0, 1] (a JSON number, or a multipart field's text)."""
    if value is None:
        return 0.0
    try:
        number = float(value) if not isinstance(value, bool) else float("nan")
    except (TypeError, ValueError):
        number = float("nan")
    if not 0.0 <= number <= 1.0:
        raise RequestError(400, f"min_confidence must be a number in [0, 1], got {value!r}",
                           "send the least probability that the completion is faithful you accept, e.g. 0.8")
    return number


def _request_id(value: Any) -> str:
    if value is None:
        return uuid.uuid4().hex
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_ID_CHARS:
        raise RequestError(400, f"id must be a non-empty string of at most {MAX_ID_CHARS} characters",
                           "send your own id for the sample, or leave it out to get a generated one")
    return value


def prepare_query(request: CompletionRequest, *, image_size: int, max_pixels: int) -> Query:
    """The encoder's input: the image decoded (size checked before any pixel) and resized, or the text."""
    if request.image is None:
        return Query(modality="text", text=request.text)
    try:
        image = load_image(request.image, max_pixels=max_pixels)
    except InputError as exc:
        raise RequestError(400, str(exc), "send a PNG, JPEG or WebP image (one that opens in an image viewer)"
                           ) from None
    return Query(modality="image", pixels=resize_for_model(image, image_size))


# -------------------------------------------------------------------------------------------------- answers


def abstain_below(row: dict[str, Any], min_confidence: float) -> dict[str, Any]:
    """The row as the job writes it with ``min_confidence``: a completion whose confidence is below it abstains
    (status "abstained", the generated modality removed; its candidates stay in the provenance)."""
    if min_confidence <= 0 or row["status"] != STATUS_COMPLETED:
        return row
    if row.get("confidence") is None:
        raise RequestError(400, f"min_confidence is {min_confidence:g} but this service's knowledge base has no "
                           "confidence model", "leave min_confidence out, or serve a KB built with calibration")
    if row["confidence"] >= min_confidence:
        return row
    return {**row, "status": STATUS_ABSTAINED, row["generated"]: None, "generated": None}


def answer(row: dict[str, Any], *, image_format: str, batch_sizes: dict[str, int]) -> tuple[int, dict[str, Any]]:
    """HTTP status and JSON body for one output row of the job's schema (``rag4dmc.pipeline.job.writer.finalize``).

    The body carries the row's provenance columns, the generated image as base64 (the input image is not
    echoed back), the actor-seconds per stage and the size of the batch each stage ran the request in.
    """
    generated_image = row["generated"] == "image" and row["image"] is not None
    body = {
        "id": row["id"],
        "status": row["status"],
        "error": row["error"],
        "generated": row["generated"],
        "text": row["text"],
        "image": base64.b64encode(row["image"]).decode("ascii") if generated_image else None,
        "image_format": image_format if generated_image else None,
        **{k: row[k] for k in ("generator", "retrieved_ids", "fusion_scores", "candidates", "candidate_ids",
                               "candidate_scores", "chosen", "kb_version", "config_hash")},
        "confidence": row.get("confidence"),
        "settings": json.loads(row["settings"]) if row["settings"] else None,
        "seconds": {s: row[f"seconds_{s}"] for s in STAGES},
        "batch_sizes": batch_sizes,
    }
    if row["status"] == STATUS_COMPLETED:
        return HTTP_OK, body
    if row["status"] == STATUS_ABSTAINED:
        body["hint"] = ("the completion's confidence is below the request's min_confidence: it is left out (the "
                        "candidates and chosen stay); lower min_confidence to get it")
        return HTTP_OK, body
    body["hint"] = ("the knowledge base gave nothing usable for this input (see error and retrieved_ids); "
                    "send another input, or serve a larger knowledge base")
    return HTTP_UNPROCESSABLE, body
