"""``[index] publish`` on the Kubernetes path: after a ``PullImage`` went through the CRI image
service proxy, find the manifest containerd's CRI plugin pulled and queue its publish job.

kubelet runs no ``lazysnap pull``, so nothing sends ``Daemon/ImagePulled``: the proxy is the one
place that sees the pull end. The lookup runs on a thread of its own, after kubelet has its
reply, and any failure is logged and dropped: publishing never changes what a pull answers.
The job itself decides whether there is anything to publish (an image served lazily is
skipped as ``not_pulled_in_full``).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import Protocol

from registry import (
    Index,
    InvalidReferenceError,
    Platform,
    RegistryError,
    host_platform,
    parse_manifest,
    parse_reference,
    select_manifest,
)
from snapshotter import errors
from snapshotter.client.containerd_api import ImageRecord
from snapshotter.daemon.index_publish import PublishJob
from snapshotter.daemon_api import MAX_MANIFEST_BYTES

log = logging.getLogger(__name__)

# containerd's CRI plugin keeps kubelet's images in this namespace.
CRI_NAMESPACE = "k8s.io"
# A burst of pulls queues lookups; beyond this many waiting, a pull is not looked up.
MAX_WAITING = 64


class ImageStore(Protocol):
    """containerd's images and content in one namespace, as ``ContainerdClient`` serves them."""

    def get_image(self, name: str) -> ImageRecord: ...

    def read_content(self, digest: str, *, max_size: int) -> bytes: ...


class LookupFailed(Exception):
    pass


def pulled_manifest(store: ImageStore, image: str, platform: Platform) -> tuple[str, str]:
    """containerd's name for ``image`` and the digest of the manifest it pulled for
    ``platform``: the image record's target, or the platform's entry of the index it names."""
    try:
        name = str(parse_reference(image))  # CRI records images under the normalised name
    except InvalidReferenceError:
        # Not echoed: a string kubelet sent by mistake may hold anything, a secret included.
        raise LookupFailed("the pulled image is not an image reference") from None
    target = store.get_image(name).target
    if not target.media_type.endswith(("image.index.v1+json", "manifest.list.v2+json")):
        return name, target.digest
    body = store.read_content(target.digest, max_size=MAX_MANIFEST_BYTES)
    if "sha256:" + hashlib.sha256(body).hexdigest() != target.digest:
        raise LookupFailed(f"{target.digest}: the content store's bytes do not match the digest")
    try:
        index = parse_manifest(body, target.media_type)
        if not isinstance(index, Index):
            raise LookupFailed(f"{target.digest} is not an image index")
        return name, select_manifest(index, platform).digest
    except RegistryError as exc:
        raise LookupFailed(f"{target.digest}: {exc}") from exc


class PulledImages:
    """Given each image kubelet pulled through the proxy, queues its publish job."""

    def __init__(
        self,
        open_store: Callable[[str], AbstractContextManager[ImageStore]],
        request: Callable[[PublishJob], bool],
        platform: Platform | None = None,
    ) -> None:
        self._open_store = open_store
        self._request = request
        self._platform = platform or host_platform()
        self._lookups = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cri-pulled")
        self._waiting = 0
        self._lock = threading.Lock()

    def pulled(self, image: str) -> None:
        """Called by the proxy once containerd answered a ``PullImage``; returns at once."""
        with self._lock:
            if self._waiting >= MAX_WAITING:
                log.warning("index publish lookup queue full; pull not looked up")
                return
            self._waiting += 1
        self._lookups.submit(self._look_up, image)

    def close(self) -> None:
        self._lookups.shutdown(wait=False, cancel_futures=True)

    def _look_up(self, image: str) -> None:
        with self._lock:
            self._waiting -= 1
        try:
            with self._open_store(CRI_NAMESPACE) as store:
                name, digest = pulled_manifest(store, image, self._platform)
            self._request(PublishJob(name, digest, CRI_NAMESPACE))
        except (LookupFailed, errors.SnapshotterError) as exc:
            log.warning("index publish: the pulled image was not found in containerd",
                        extra={"event": "index_publish_lookup_failed", "error": str(exc)[:500]})
        except Exception:  # a bug must not stop later lookups
            log.exception("index publish: looking up a pulled image failed")
