"""OCI image layouts on disk for tests: deterministic images and indexes built without a network.

`make_image` and `make_index` write an OCI image layout (the `oci:` transport of skopeo) with real
config JSON and gzip'ed tar layers of seeded random bytes: the same arguments always give the same
digests. `read_layout`, `image_graph` and `assert_same_image` read a layout back and compare two.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OCI_LAYOUT = {"imageLayoutVersion": "1.0.0"}
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"

# Fixed so that the same seed gives the same bytes on every run.
_EPOCH = 1_700_000_000
_CREATED = "2023-11-14T22:13:20Z"


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: dict[str, str] | None = None
    annotations: dict[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.platform:
            out["platform"] = self.platform
        if self.annotations:
            out["annotations"] = self.annotations
        return out


@dataclass
class BuiltImage:
    """What `make_image` wrote: the manifest descriptor and the digests it references."""

    manifest: Descriptor
    config: Descriptor
    layers: list[Descriptor]
    diff_ids: list[str]

    @property
    def digest(self) -> str:
        return self.manifest.digest

    @property
    def blob_digests(self) -> list[str]:
        return [self.config.digest, *(layer.digest for layer in self.layers)]


@dataclass
class BuiltIndex:
    """What `make_index` wrote: the index descriptor and one image per platform."""

    index: Descriptor
    images: dict[tuple[str, str], BuiltImage] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return self.index.digest


# -- writing ---------------------------------------------------------------------------------------


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def _init_layout(root: Path) -> None:
    (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (root / "oci-layout").write_text(json.dumps(OCI_LAYOUT))
    if not (root / "index.json").exists():
        (root / "index.json").write_bytes(_canonical({"schemaVersion": 2, "mediaType": INDEX, "manifests": []}))


def _write_blob(root: Path, data: bytes, media_type: str, **extra: Any) -> Descriptor:
    digest = sha256_digest(data)
    path = root / "blobs" / "sha256" / digest.split(":", 1)[1]
    if not path.exists():
        path.write_bytes(data)
    return Descriptor(media_type, digest, len(data), **extra)


def _tag(root: Path, tag: str, descriptor: Descriptor) -> None:
    """Point `tag` at `descriptor` in index.json (replacing an older entry of the same tag)."""
    index = json.loads((root / "index.json").read_text())
    kept = [m for m in index.get("manifests", []) if m.get("annotations", {}).get(REF_NAME) != tag]
    annotations = {**(descriptor.annotations or {}), REF_NAME: tag}
    kept.append(
        Descriptor(descriptor.media_type, descriptor.digest, descriptor.size, annotations=annotations).to_json()
    )
    index["manifests"] = kept
    (root / "index.json").write_bytes(_canonical(index))


def layer_tar(rng: random.Random, size: int, index: int) -> bytes:
    """An uncompressed tar with one file of `size` random bytes, with fixed metadata."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        directory = tarfile.TarInfo(f"layer{index}")
        directory.type = tarfile.DIRTYPE
        directory.mode = 0o755
        directory.mtime = _EPOCH
        tar.addfile(directory)
        info = tarfile.TarInfo(f"layer{index}/data.bin")
        info.size = size
        info.mode = 0o644
        info.mtime = _EPOCH
        tar.addfile(info, io.BytesIO(rng.randbytes(size)))
    return buffer.getvalue()


def gzip_deterministic(data: bytes) -> bytes:
    buffer = io.BytesIO()
    # mtime=0 and no file name: the gzip header carries nothing that changes between runs.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=6) as gz:
        gz.write(data)
    return buffer.getvalue()


def _build_image(
    root: Path,
    *,
    layers: int,
    layer_size: int,
    seed: int,
    os_name: str = "linux",
    architecture: str = "amd64",
    variant: str | None = None,
) -> BuiltImage:
    rng = random.Random(f"{seed}/{os_name}/{architecture}/{variant or ''}")
    layer_descriptors: list[Descriptor] = []
    diff_ids: list[str] = []
    for i in range(layers):
        tar = layer_tar(rng, layer_size, i)
        diff_ids.append(sha256_digest(tar))
        layer_descriptors.append(_write_blob(root, gzip_deterministic(tar), LAYER_GZIP))
    config: dict[str, Any] = {
        "created": _CREATED,
        "architecture": architecture,
        "os": os_name,
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["/bin/true"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": _CREATED, "created_by": f"wharf tests layer {i} seed {seed}"} for i in range(layers)],
    }
    if variant:
        config["variant"] = variant
    config_descriptor = _write_blob(root, _canonical(config), CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": config_descriptor.to_json(),
        "layers": [d.to_json() for d in layer_descriptors],
    }
    platform = {"architecture": architecture, "os": os_name}
    if variant:
        platform["variant"] = variant
    manifest_descriptor = _write_blob(root, _canonical(manifest), MANIFEST, platform=platform)
    return BuiltImage(manifest_descriptor, config_descriptor, layer_descriptors, diff_ids)


def make_image(
    dir: Path | str,
    tag: str,
    *,
    layers: int = 2,
    layer_size: int = 64 * 1024,
    seed: int = 0,
    os_name: str = "linux",
    architecture: str = "amd64",
) -> BuiltImage:
    """Write a single-platform image tagged `tag` into the OCI layout at `dir` (created if needed)."""
    root = Path(dir)
    _init_layout(root)
    image = _build_image(
        root, layers=layers, layer_size=layer_size, seed=seed, os_name=os_name, architecture=architecture
    )
    _tag(root, tag, Descriptor(image.manifest.media_type, image.manifest.digest, image.manifest.size))
    return image


def make_index(
    dir: Path | str,
    tag: str,
    *,
    platforms: list[tuple[str, str]] | None = None,
    layers: int = 2,
    layer_size: int = 64 * 1024,
    seed: int = 0,
) -> BuiltIndex:
    """Write a multi-platform OCI image index tagged `tag`, one image manifest per (os, arch)."""
    root = Path(dir)
    _init_layout(root)
    images: dict[tuple[str, str], BuiltImage] = {}
    for os_name, architecture in platforms or [("linux", "amd64"), ("linux", "arm64")]:
        variant = "v8" if architecture == "arm64" else None
        images[(os_name, architecture)] = _build_image(
            root,
            layers=layers,
            layer_size=layer_size,
            seed=seed,
            os_name=os_name,
            architecture=architecture,
            variant=variant,
        )
    index = {
        "schemaVersion": 2,
        "mediaType": INDEX,
        "manifests": [image.manifest.to_json() for image in images.values()],
    }
    descriptor = _write_blob(root, _canonical(index), INDEX)
    _tag(root, tag, descriptor)
    return BuiltIndex(descriptor, images)


# -- reading back and comparing --------------------------------------------------------------------


@dataclass
class Layout:
    """An OCI layout read from disk: its index.json and a way to fetch verified blobs."""

    root: Path
    index: dict[str, Any]

    def blob(self, digest: str) -> bytes:
        algorithm, hex_ = digest.split(":", 1)
        data = (self.root / "blobs" / algorithm / hex_).read_bytes()
        actual = f"{algorithm}:" + hashlib.new(algorithm, data).hexdigest()
        assert actual == digest, f"blob {digest} in {self.root} holds bytes of {actual}"
        return data

    def resolve(self, tag: str) -> dict[str, Any]:
        """The index.json descriptor of `tag`."""
        found = [m for m in self.index.get("manifests", []) if m.get("annotations", {}).get(REF_NAME) == tag]
        assert found, f"no tag {tag!r} in {self.root}/index.json: {self.index}"
        assert len(found) == 1, f"tag {tag!r} is in {self.root}/index.json {len(found)} times"
        return found[0]


def read_layout(dir: Path | str) -> Layout:
    root = Path(dir)
    assert json.loads((root / "oci-layout").read_text()).get("imageLayoutVersion") == "1.0.0"
    return Layout(root, json.loads((root / "index.json").read_text()))


def image_graph(dir: Path | str, tag: str) -> tuple[str, dict[str, bytes]]:
    """(top digest, every blob reachable from `tag` by digest: manifests, indexes, configs, layers)."""
    layout = read_layout(dir)
    top = layout.resolve(tag)
    blobs: dict[str, bytes] = {}

    def walk(descriptor: dict[str, Any]) -> None:
        digest = descriptor["digest"]
        if digest in blobs:
            return
        data = layout.blob(digest)
        assert len(data) == descriptor["size"], f"{digest}: size {len(data)} != descriptor size {descriptor['size']}"
        blobs[digest] = data
        if descriptor["mediaType"] in (
            MANIFEST,
            INDEX,
            "application/vnd.docker.distribution.manifest.v2+json",
            "application/vnd.docker.distribution.manifest.list.v2+json",
        ):
            document = json.loads(data)
            for child in document.get("manifests", []):
                walk(child)
            if "config" in document:
                walk(document["config"])
            for layer in document.get("layers", []):
                walk(layer)

    walk(top)
    return top["digest"], blobs


def assert_same_image(a_dir: Path | str, a_tag: str, b_dir: Path | str, b_tag: str) -> str:
    """Both tags name the same top digest and every reachable blob is byte-identical; returns the digest."""
    a_digest, a_blobs = image_graph(a_dir, a_tag)
    b_digest, b_blobs = image_graph(b_dir, b_tag)
    assert a_digest == b_digest, f"top digest changed: {a_digest} -> {b_digest}"
    assert sorted(a_blobs) == sorted(b_blobs), (
        f"blob sets differ: only in {a_dir}: {sorted(set(a_blobs) - set(b_blobs))}, "
        f"only in {b_dir}: {sorted(set(b_blobs) - set(a_blobs))}"
    )
    for digest, data in a_blobs.items():
        assert b_blobs[digest] == data, f"blob {digest} differs"
    return a_digest
