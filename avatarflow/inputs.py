"""Speech and portrait: fetched through the source policy, checked before any money is spent, and
staged in the archive bucket where the API can fetch them. voice_script templates render in a
bounded sandbox."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import jinja2
import jinja2.nodes
import jinja2.sandbox
import jinja2.visitor

from avatarflow.contract import AUDIO_MAX_BYTES, IMAGE_MAX_BYTES, VOICE_SCRIPT_MAX_CHARS
from avatarflow.errors import AvatarflowError
from avatarflow.fingerprint import sha256_hex
from avatarflow.media.audio import check_audio
from avatarflow.media.fetch import read_source
from avatarflow.media.policy import SourcePolicy, display_source, resolve_policy
from avatarflow.media.portrait import check_portrait
from avatarflow.spec import VideoRequest
from avatarflow.store import Store

EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp"}

# Templates are untrusted (a UI user's voice_script, a calendar's rows): bounded in size and work.
MAX_TEMPLATE_CHARS = VOICE_SCRIPT_MAX_CHARS   # the template is a voice_script
MAX_RENDERED_CHARS = VOICE_SCRIPT_MAX_CHARS   # and so is what it renders to
MAX_TEMPLATE_WORK = 10_000                    # loop iterations + calls + operators, per render
MAX_RANGE = 1_000                             # items of one range()
MAX_INT_BITS = 4_096                          # size of an integer an operator may produce


class TemplateError(AvatarflowError, ValueError):
    """voice_script could not be rendered from the row's fields."""

    bad_input = True

    field = "voice_script"


class _Budget(Exception):
    """A template went past a cap (caught and reported as TemplateError)."""


_work: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("avatarflow_template_work", default=None)


def _spend(n: int = 1) -> None:
    counter = _work.get()
    if counter is None:
        return
    counter[0] += n
    if counter[0] > MAX_TEMPLATE_WORK:
        raise _Budget(f"does too much work (more than {MAX_TEMPLATE_WORK} loop iterations, calls and operations)")


def _sized(value: Any, what: str = "a value") -> Any:
    if isinstance(value, (str, bytes, list, tuple, dict, set)) and len(value) > MAX_RENDERED_CHARS:
        raise _Budget(f"builds {what} longer than {MAX_RENDERED_CHARS} characters")
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_BITS:
        raise _Budget(f"builds a number larger than {MAX_INT_BITS} bits")
    return value


def _check_args(args: tuple, kwargs: dict) -> None:
    """No argument may ask for a size past the caps (`'x'.ljust(10**9)`, `center(10**9)`)."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, (int, float)) and not isinstance(a, bool) and abs(a) > MAX_RENDERED_CHARS:
            raise _Budget(f"passes a size larger than {MAX_RENDERED_CHARS}")


def _capped_range(*args: int) -> range:
    r = range(*args)
    if len(r) > MAX_RANGE:
        raise _Budget(f"asks for a range of more than {MAX_RANGE} items")
    return r


def _capped_filter(f: Any) -> Any:
    @functools.wraps(f)
    def run(*args: Any, **kwargs: Any) -> Any:
        _spend()
        _check_args(args, kwargs)
        out = f(*args, **kwargs)
        if inspect.isgenerator(out) or isinstance(out, (map, filter)):
            out = list(itertools.islice(out, MAX_RENDERED_CHARS + 1))
        return _sized(out)

    return run


class _Guard(jinja2.visitor.NodeTransformer):
    """Every for-loop's iterable and every `~` concatenation go through the environment's guards."""

    def visit_For(self, node: jinja2.nodes.For) -> jinja2.nodes.For:
        self.generic_visit(node)
        node.iter = jinja2.nodes.Call(jinja2.nodes.EnvironmentAttribute("af_loop"), [node.iter], [], None, None,
                                      lineno=node.lineno)
        return node

    def visit_Concat(self, node: jinja2.nodes.Concat) -> jinja2.nodes.Call:
        self.generic_visit(node)
        return jinja2.nodes.Call(jinja2.nodes.EnvironmentAttribute("af_concat"), list(node.nodes), [], None, None,
                                 lineno=node.lineno)


class BoundedSandbox(jinja2.sandbox.SandboxedEnvironment):
    """Jinja's sandbox with the work bounded: loop iterations, calls and operators counted against
    MAX_TEMPLATE_WORK; range() at most MAX_RANGE items; string and list repetition, concatenation,
    `%` formatting, powers and every filter or method result capped in size; no str.format, no
    lipsum. The rendered text is capped by render_script."""

    intercepted_binops = frozenset({"*", "**", "+", "%", "//", "/"})
    intercepted_unops = frozenset({"-", "+"})
    BLOCKED_FILTERS = frozenset({"format"})
    BLOCKED_ATTRIBUTES = frozenset({"format", "format_map", "expandtabs", "zfill", "ljust", "rjust", "center"})

    def __init__(self) -> None:
        super().__init__(undefined=jinja2.StrictUndefined, autoescape=False)
        self.globals.pop("lipsum", None)
        self.globals["range"] = _capped_range
        self.filters = {name: _capped_filter(f) for name, f in self.filters.items()
                        if name not in self.BLOCKED_FILTERS}

    def _parse(self, source: str, name: str | None, filename: str | None) -> jinja2.nodes.Template:
        return _Guard().visit(super()._parse(source, name, filename))

    def af_loop(self, iterable: Any) -> Iterator[Any]:
        for item in iterable:
            _spend()
            yield item

    def af_concat(self, *items: Any) -> str:
        _spend()
        total, parts = 0, []
        for item in items:
            text = str(item)
            total += len(text)
            if total > MAX_RENDERED_CHARS:
                raise _Budget(f"builds a text longer than {MAX_RENDERED_CHARS} characters")
            parts.append(text)
        return "".join(parts)

    def wrap_str_format(self, value: Any) -> None:
        """str.format and format_map are not offered at all (a width in the format string is a
        size no argument check sees); is_safe_attribute then refuses them."""
        return None

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if attr in self.BLOCKED_ATTRIBUTES:
            return False
        return super().is_safe_attribute(obj, attr, value)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        _spend()
        _check_args(args, {k: v for k, v in kwargs.items() if not k.startswith("_")})
        return _sized(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _spend()
        seqs = (str, list, tuple, bytes)
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, seqs) and isinstance(n, int):
                    if len(seq) * max(n, 0) > MAX_RENDERED_CHARS:
                        raise _Budget(f"repeats a text or list past {MAX_RENDERED_CHARS} items")
            if isinstance(left, int) and isinstance(right, int) and \
                    left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise _Budget(f"builds a number larger than {MAX_INT_BITS} bits")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and \
                    max(left.bit_length(), 1) * right > MAX_INT_BITS:
                raise _Budget(f"builds a number larger than {MAX_INT_BITS} bits")
        elif operator == "%":
            if isinstance(left, (str, bytes)):
                raise _Budget("uses %-formatting of text (not allowed)")
        elif operator == "+":
            if isinstance(left, seqs) and isinstance(right, seqs) and len(left) + len(right) > MAX_RENDERED_CHARS:
                raise _Budget(f"builds a text or list longer than {MAX_RENDERED_CHARS} items")
        return _sized(super().call_binop(context, operator, left, right))

    def call_unop(self, context: Any, operator: str, arg: Any) -> Any:
        _spend()
        return super().call_unop(context, operator, arg)


_jinja = BoundedSandbox()


@dataclass(frozen=True)
class SpeechInput:
    """What the avatar says: a script, or a staged recording."""

    voice_script: str
    audio_url: str | None = None
    audio_sha256: str | None = None
    audio_duration_s: float | None = None
    audio_source: str | None = None


@dataclass(frozen=True)
class PortraitInput:
    url: str
    sha256: str
    format: str
    width: int
    height: int
    source: str


def render_script(template: str, fields: dict[str, Any] | None, field: str = "voice_script") -> str:
    """voice_script (or `field`, e.g. brief) as a Jinja2 template over a row's fields; literal text when there are none.

    Untrusted: the template is at most MAX_TEMPLATE_CHARS, renders in a bounded sandbox
    (BoundedSandbox: MAX_TEMPLATE_WORK steps, range() of at most MAX_RANGE, sizes capped) and its
    text may not pass MAX_RENDERED_CHARS (rendering stops there). TemplateError otherwise."""
    if not isinstance(template, str):
        raise TemplateError(f"{field} is not a string")
    if len(template) > MAX_TEMPLATE_CHARS:
        raise TemplateError(f"{field} is too long ({len(template)} characters); "
                            f"allowed: at most {MAX_TEMPLATE_CHARS}")
    if not fields:
        return template
    token = _work.set([0])
    try:
        compiled = _jinja.from_string(template)
        out, size = [], 0
        for chunk in compiled.generate(**fields):
            size += len(chunk)
            if size > MAX_RENDERED_CHARS:
                raise _Budget(f"renders to more than {MAX_RENDERED_CHARS} characters")
            out.append(chunk)
        text = "".join(out)
    except jinja2.UndefinedError as e:
        raise TemplateError(
            f"{field} template uses a field the row lacks ({e.message}); fields: {', '.join(sorted(fields))}"
        ) from None
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"{field} template is not valid Jinja2: {e.message} (line {e.lineno})") from None
    except _Budget as e:
        raise TemplateError(f"{field} template {e}; allowed: at most {MAX_RENDERED_CHARS} characters "
                            f"rendered, {MAX_TEMPLATE_WORK} steps, range() of {MAX_RANGE}") from None
    except jinja2.sandbox.SecurityError:
        raise TemplateError(f"{field} template uses an operation the sandbox does not allow") from None
    except RecursionError:
        raise TemplateError(f"{field} template recurses too deeply") from None
    except Exception as e:  # TypeError, ZeroDivisionError, OverflowError... from the template's own code
        raise TemplateError(f"{field} template failed to render ({type(e).__name__})") from None
    finally:
        _work.reset(token)
    if not text.strip():
        raise TemplateError(f"{field} template rendered to empty text")
    return text


async def _read(ref: str, field: str, store: Store | None, max_bytes: int, policy: SourcePolicy) -> bytes:
    return await asyncio.to_thread(
        read_source, ref, field=field, s3_client=store.s3 if store else None, max_bytes=max_bytes,
        policy=policy,
    )


async def _policy(store: Store | None, policy: SourcePolicy | None) -> SourcePolicy:
    return policy if policy is not None else await resolve_policy(store)


async def fetch_media(ref: str, field: str, store: Store, *, policy: SourcePolicy | None = None) -> bytes:
    """The bytes of an `image` or `audio` source under the policy in force (default: the
    operator's), within that field's size cap."""
    cap = IMAGE_MAX_BYTES if field == "image" else AUDIO_MAX_BYTES
    return await _read(ref, field, store, cap, await _policy(store, policy))


async def prepare_speech(request: VideoRequest, store: Store, *, policy: SourcePolicy | None = None) -> SpeechInput:
    """Render the script, or fetch (through the source policy: by default the operator's, from
    avatarflow.config), check and stage the audio."""
    script = render_script(request.voice_script, request.template_fields)
    if not request.audio:
        return SpeechInput(voice_script=script)
    data = await _read(request.audio, "audio", store, AUDIO_MAX_BYTES, await _policy(store, policy))
    info = await asyncio.to_thread(check_audio, data, source=display_source(request.audio))
    url = await store.stage(info.data, info.sha256, info.format, info.content_type)
    return SpeechInput(
        voice_script=script,
        audio_url=url,
        audio_sha256=info.sha256,
        audio_duration_s=info.duration_s,
        audio_source=display_source(request.audio),
    )


async def prepare_portrait(request: VideoRequest, store: Store, *, policy: SourcePolicy | None = None) -> PortraitInput:
    """Fetch (through the source policy), check (format, size, bomb guard, orientation, a face),
    then stage the portrait."""
    data = await _read(request.image, "image", store, IMAGE_MAX_BYTES, await _policy(store, policy))
    portrait = await asyncio.to_thread(check_portrait, data, source=display_source(request.image))
    sha = sha256_hex(portrait.data)
    url = await store.stage(portrait.data, sha, EXTENSIONS[portrait.format], portrait.content_type)
    return PortraitInput(
        url=url, sha256=sha, format=portrait.format, width=portrait.width,
        height=portrait.height, source=display_source(request.image),
    )
