"""Azure Custom Vision projects as an ingest source: ``customvision://HOST/PROJECT_ID``.

The project is listed through Microsoft's own client (``azure-cognitiveservices-vision-
customvision``, whose training client speaks ``{Endpoint}/customvision/v3.4-preview/
training``): ``get_tags``, ``get_tagged_image_count`` and ``get_tagged_images`` page by page
(take/skip, oldest first, so images added meanwhile land after the pages already read),
then ``get_untagged_image_count`` and ``get_untagged_images``. Each image's
``original_image_uri`` is downloaded by ingest's workers (:class:`ImageFetcher`).

The address::

    customvision://<endpoint host>[:port]/<project id>[?iteration=<id>][&scheme=http]

names the endpoint ``https://<endpoint host>`` (``scheme=http`` is accepted only for a
loopback host, i.e. a local stand-in: the key never crosses a network in clear). The
training key comes only from the environment, :data:`KEY_ENV`; it is sent in one header
to the endpoint and nowhere else: redirects are not followed, image downloads carry no
key, and no message, record or log line of triview holds it.

What "nothing outside the data root" means here: the data root is the project. An image
is downloaded only from a URI the API returned, only over https (http only from the
loopback stand-in's own host), only from the endpoint's host or Azure Blob Storage (where
Custom Vision keeps originals: :data:`STORAGE_SUFFIXES`) or a host the operator allowed
(``allowed_roots`` entries ``https://HOST``), without following redirects. Any other URI
(another host, ``file:``, a link-local metadata address, credentials in the URI) is
quarantined as ``outside_root`` and never requested.
"""
from __future__ import annotations

import ipaddress
import os
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterable
from urllib.parse import parse_qs, urlsplit

SCHEME = "customvision"
#: The only place the training key is read from (a Kubernetes Secret on the cluster).
KEY_ENV = "CUSTOMVISION_TRAINING_KEY"
#: Images per page: the service's maximum ``take``.
PAGE_SIZE = 256
#: Host suffixes of Azure Blob Storage (public, China, US Government clouds), where
#: Custom Vision stores the original images it hands out as SAS URIs.
STORAGE_SUFFIXES = (".blob.core.windows.net", ".blob.core.chinacloudapi.cn",
                    ".blob.core.usgovcloudapi.net")
#: Tries per request (API call or download) on 429 and 5xx, with exponential backoff.
TRIES = 6
BACKOFF_FACTOR_S = 0.5
#: A Retry-After header longer than this is cut to it (a bad header must not hang ingest).
MAX_RETRY_AFTER_S = 60
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
TIMEOUT_S = (10, 60)   # connect, read


class CustomVisionError(ValueError):
    """The project cannot be read as a whole (wrong key, wrong project, service down)."""


class DownloadFailed(OSError):
    """One image could not be downloaded (its status or network error is the message)."""


def is_customvision(text: str) -> bool:
    return str(text).lower().startswith(f"{SCHEME}://")


@dataclass(frozen=True)
class ProjectUri:
    """Where a project lives: the endpoint URL, the project and optionally an iteration."""
    endpoint: str                 # https://host[:port] (http only for loopback)
    project_id: str
    iteration_id: str | None = None

    @property
    def host(self) -> str:
        return urlsplit(self.endpoint).hostname or ""

    @classmethod
    def parse(cls, text: str) -> "ProjectUri":
        """Check and split ``customvision://HOST[:PORT]/PROJECT_ID[?iteration=ID][&scheme=http]``.
        Messages never repeat the text: a key pasted into it must not reach a log."""
        usage = f"expected {SCHEME}://<endpoint host>/<project id>[?iteration=<id>]"
        try:
            parts = urlsplit(str(text).strip())
            port = parts.port
        except ValueError as exc:
            raise CustomVisionError(f"not a Custom Vision address ({exc}); {usage}") from None
        if parts.scheme.lower() != SCHEME:
            raise CustomVisionError(f"not a Custom Vision address; {usage}")
        if "@" in parts.netloc:
            raise CustomVisionError(f"the address holds credentials: put the training key in "
                                    f"${KEY_ENV}, never in the address; {usage}")
        host = parts.hostname
        if not host:
            raise CustomVisionError(f"the address names no endpoint host; {usage}")
        segments = [s for s in parts.path.split("/") if s]
        if len(segments) != 1 or not _is_uuid(segments[0]):
            raise CustomVisionError(f"the address names no project id (a UUID); {usage}")
        query = parse_qs(parts.query, keep_blank_values=True)
        unknown = sorted(set(query) - {"iteration", "scheme"})
        if unknown or any(len(v) != 1 for v in query.values()):
            raise CustomVisionError(f"unknown or repeated query parameters {unknown}; "
                                    f"only iteration=<id> and scheme=http")
        iteration = query.get("iteration", [None])[0] or None
        if iteration is not None and not _is_uuid(iteration):
            raise CustomVisionError("iteration must be an iteration id (a UUID)")
        scheme = query.get("scheme", ["https"])[0].lower()
        if scheme not in ("https", "http"):
            raise CustomVisionError(f"scheme must be https (default) or http, got {scheme!r}")
        if scheme == "http" and not _is_loopback(host):
            raise CustomVisionError("scheme=http is only for a stand-in on this machine "
                                    "(a loopback host): the key must not cross a network in clear")
        netloc = host if ":" not in host else f"[{host}]"
        endpoint = f"{scheme}://{netloc}{'' if port is None else f':{port}'}"
        return cls(endpoint, str(uuid.UUID(segments[0])),
                   None if iteration is None else str(uuid.UUID(iteration)))


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
        return True
    except ValueError:
        return False


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def training_key(environ=os.environ) -> str:
    key = environ.get(KEY_ENV, "").strip()
    if not key:
        raise CustomVisionError(f"no training key: set ${KEY_ENV} (on a cluster, the Secret "
                                f"the pipeline was compiled with mounts it)")
    return key


# ----------------------------------------------------------------------------- retries


def retry_policy(*, statuses: Iterable[int] = RETRY_STATUSES, raise_on_status: bool = True):
    """urllib3's Retry as both the API client and the downloads use it: ``TRIES`` tries on
    429/5xx and connection errors, exponential backoff, Retry-After honoured up to
    ``MAX_RETRY_AFTER_S``, redirects never followed."""
    from urllib3.util.retry import Retry

    return Retry(total=TRIES - 1, connect=TRIES - 1, read=TRIES - 1, status=TRIES - 1,
                 redirect=False, raise_on_redirect=False, status_forcelist=frozenset(statuses),
                 allowed_methods=frozenset({"GET"}), backoff_factor=BACKOFF_FACTOR_S,
                 respect_retry_after_header=True, retry_after_max=MAX_RETRY_AFTER_S,
                 raise_on_status=raise_on_status)


# ----------------------------------------------------------------------------- listing


@dataclass(frozen=True)
class ProjectImage:
    """One image of the project as the API listed it."""
    image_id: str
    labels: tuple[str, ...]        # tag names, sorted; () for an untagged image
    uri: str                       # original_image_uri
    refused: str | None = None     # why the URI is never requested (None: download it)


@dataclass
class ProjectListing:
    images: list[ProjectImage]
    tagged: int                    # get_tagged_image_count
    untagged: int                  # get_untagged_image_count
    notes: list[str] = field(default_factory=list)


_RETRY_FIELDS = ("total", "connect", "read", "status", "other", "redirect", "status_forcelist",
                 "allowed_methods", "backoff_factor", "backoff_max", "retry_after_max",
                 "respect_retry_after_header", "raise_on_status", "raise_on_redirect")


class _Api:
    """The official training client, set up so that the key goes to the endpoint only,
    and its calls, whose refusals become :class:`CustomVisionError` that say what to fix."""

    def __init__(self, project: ProjectUri, key: str) -> None:
        from azure.cognitiveservices.vision.customvision.training import (
            CustomVisionTrainingClient)
        from msrest.authentication import ApiKeyCredentials

        self.project = project
        self.client = CustomVisionTrainingClient(
            project.endpoint, ApiKeyCredentials(in_headers={"Training-key": key}))
        config = self.client.config
        # the client's HTTP session already holds its Retry object: change that one in place
        ours, theirs = retry_policy(), config.retry_policy.policy
        for name in _RETRY_FIELDS:
            setattr(theirs, name, getattr(ours, name))
        # a redirect would carry the Training-key header to whatever host it names
        config.redirect_policy.allow = False
        config.enable_http_logger = False   # it would log the request headers
        config.connection.timeout = TIMEOUT_S
        self.last_status: int | None = None  # the SDK cannot always read an error answer
        config.hooks.append(self._remember_status)

    def _remember_status(self, response, *args, **kwargs) -> None:
        self.last_status = response.status_code

    def call(self, what: str, method: str, *args, **kwargs):
        from azure.cognitiveservices.vision.customvision.training.models import (
            CustomVisionErrorException)
        from msrest.exceptions import ClientRequestError

        project = self.project
        self.last_status = None
        try:
            return getattr(self.client, method)(*args, **kwargs)
        except CustomVisionErrorException as exc:
            status = getattr(exc.response, "status_code", None)
            detail = _error_text(exc)
        except ClientRequestError as exc:
            raise CustomVisionError(f"could not read {what} from Custom Vision at "
                                    f"{project.endpoint} after {TRIES} tries: "
                                    f"{_short(exc)}") from None
        except Exception as exc:  # the SDK fails to build its error from some answers
            if self.last_status is None or self.last_status < 300:
                raise
            status, detail = self.last_status, f"an answer the client cannot read ({_short(exc)})"
        if status == 401:
            raise CustomVisionError(
                f"Custom Vision at {project.endpoint} refused the training key (HTTP 401) for "
                f"{what}: check ${KEY_ENV} (the training key of that resource, not the "
                f"prediction key) and the endpoint")
        if status == 404:
            raise CustomVisionError(
                f"Custom Vision at {project.endpoint} has no project {project.project_id}"
                f"{'' if project.iteration_id is None else f' (iteration {project.iteration_id})'}"
                f" for this key (HTTP 404, {what}): check the project id")
        raise CustomVisionError(f"Custom Vision at {project.endpoint} answered HTTP {status} to "
                                f"{what}{f': {detail}' if detail else ''}")


def _error_text(exc) -> str:
    error = getattr(exc, "error", None)
    parts = [getattr(error, "code", None), getattr(error, "message", None)]
    return ": ".join(str(p) for p in parts if p)[:300]


def _short(exc: BaseException) -> str:
    inner = exc.__cause__ or exc.__context__
    return f"{type(inner or exc).__name__}: {str(inner or exc)[:300]}"


def _pages(fetch: Callable[[int, int], list], expected: int, page_size: int) -> list:
    """Every item of a take/skip listing: pages until one comes back empty or ``expected``
    are in hand (a page may hold fewer than asked for)."""
    out, seen = [], set()
    while len(out) < expected:
        page = fetch(page_size, len(out))
        fresh = [img for img in page or [] if img.id not in seen]
        if not fresh:
            break
        seen.update(img.id for img in fresh)
        out.extend(fresh)
    return out


def list_project(project: ProjectUri, key: str, *, allowed_hosts: Iterable[str] = (),
                 page_size: int = PAGE_SIZE) -> ProjectListing:
    """Every image of the project, tagged then untagged, with its labels and whether its
    URI may be downloaded. Raises :class:`CustomVisionError` when the service refuses
    (401 wrong key, 404 wrong project, 429/5xx after ``TRIES`` tries) or when fewer images
    are listed than the service counted (the project changed under the listing)."""
    api = _Api(project, key)
    pid, it = project.project_id, project.iteration_id
    tags = api.call("the project's tags", "get_tags", pid, iteration_id=it)
    names = {t.id: t.name for t in tags or []}
    n_tagged = api.call("the tagged image count", "get_tagged_image_count", pid,
                        iteration_id=it)
    tagged = _pages(lambda take, skip: api.call(
        f"tagged images {skip}..{skip + take - 1}", "get_tagged_images", pid,
        iteration_id=it, order_by="Oldest", take=take, skip=skip), n_tagged, page_size)
    n_untagged = api.call("the untagged image count", "get_untagged_image_count", pid,
                          iteration_id=it)
    untagged = _pages(lambda take, skip: api.call(
        f"untagged images {skip}..{skip + take - 1}", "get_untagged_images", pid,
        iteration_id=it, order_by="Oldest", take=take, skip=skip), n_untagged, page_size)
    for kind, got, counted in (("tagged", tagged, n_tagged), ("untagged", untagged, n_untagged)):
        if len(got) < counted:
            raise CustomVisionError(
                f"Custom Vision counted {counted} {kind} images in project {pid} but listed "
                f"{len(got)}: the project changed while it was read; run the import again")
    allowed = DownloadHosts.for_project(project, allowed_hosts)
    images, seen = [], set()
    for img in tagged + untagged:
        if img.id in seen:   # tagged meanwhile: listed in both
            continue
        seen.add(img.id)
        images.append(ProjectImage(str(img.id), _labels_of(img, names),
                                   img.original_image_uri or "",
                                   allowed.refusal(img.original_image_uri or "")))
    notes = [f"Custom Vision project {pid} at {project.endpoint}: {n_tagged} tagged, "
             f"{n_untagged} untagged images, {len(names)} tags"]
    return ProjectListing(images, n_tagged, n_untagged, notes)


def _labels_of(img, names: dict[str, str]) -> tuple[str, ...]:
    """Tag names of an image (sorted); an object-detection image's region tags when it
    carries no image-level tags."""
    marks = list(img.tags or []) or list(img.regions or [])
    labels = {(m.tag_name or names.get(m.tag_id) or str(m.tag_id)).strip() for m in marks}
    return tuple(sorted(label for label in labels if label))


# ----------------------------------------------------------------------------- downloads


@dataclass(frozen=True)
class DownloadHosts:
    """Which image URIs may be requested (see the module docstring)."""
    endpoint_scheme: str
    endpoint_host: str
    extra_hosts: frozenset[str]

    @classmethod
    def for_project(cls, project: ProjectUri, allowed: Iterable[str] = ()) -> "DownloadHosts":
        extra = set()
        for root in allowed:
            parts = urlsplit(root.strip())
            if parts.scheme == "https" and parts.hostname:
                extra.add(parts.hostname.lower())
        return cls(urlsplit(project.endpoint).scheme, project.host.lower(), frozenset(extra))

    def refusal(self, uri: str) -> str | None:
        """None when ``uri`` may be downloaded, else why not (scheme and host only: the
        query of a SAS URI is a credential)."""
        try:
            parts = urlsplit(uri)
            parts.port  # noqa: B018 (raises on a malformed port)
        except ValueError:
            return "malformed image URI"
        scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
        if not scheme:
            return ("a relative artifact path (a VNET project's GetArtifact), which triview "
                    "does not fetch")
        where = f"{scheme}://{host}" if host else f"{scheme}:"
        if "@" in parts.netloc:
            return f"{where}: credentials in the URI"
        if scheme == "http" and self.endpoint_scheme == "http" and host == self.endpoint_host:
            return None   # the loopback stand-in serves its own images
        if scheme != "https":
            return f"{where}: only https is downloaded"
        if host == self.endpoint_host or host in self.extra_hosts \
                or any(host.endswith(s) for s in STORAGE_SUFFIXES):
            return None
        return (f"{where}: not the endpoint's host nor Azure Blob Storage (allow it with "
                f"--allow-root https://{host})")


class ImageFetcher:
    """Downloads of original images, one session per ingest worker: ``TRIES`` tries on
    429/5xx with backoff, no redirects, no key, at most ``max_bytes`` read."""

    def __init__(self) -> None:
        import requests
        from requests.adapters import HTTPAdapter

        self.session = requests.Session()
        self.session.trust_env = True   # proxies from the environment, as the API client
        adapter = HTTPAdapter(max_retries=retry_policy(raise_on_status=False))
        self.session.mount("https://", adapter)
        self.session.mount("http://", adapter)

    def fetch(self, uri: str, max_bytes: int) -> bytes:
        """The bytes at ``uri`` (at most ``max_bytes + 1``: the caller sees it is too
        large); :class:`DownloadFailed` on any HTTP or network failure."""
        import requests

        try:
            with self.session.get(uri, stream=True, timeout=TIMEOUT_S,
                                  allow_redirects=False) as response:
                if response.status_code != 200:
                    raise DownloadFailed(f"HTTP {response.status_code}"
                                         + (f" after {TRIES} tries"
                                            if response.status_code in RETRY_STATUSES else ""))
                chunks, size = [], 0
                for chunk in response.iter_content(1 << 16):
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > max_bytes:
                        break
                return b"".join(chunks)
        except requests.RequestException as exc:
            reason = exc.__class__.__name__
            raise DownloadFailed(f"{reason} after {TRIES} tries") from None
