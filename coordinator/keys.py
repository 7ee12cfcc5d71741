"""The one place that knows how coordinator records are laid out in the KV.

Repository names never contain '@', so `<repo>@` is an unambiguous prefix for everything
that belongs to one repository, and byte order of keys is lexical order of names and tags.
"""

from __future__ import annotations

from urllib.parse import quote

REPOSITORIES = "repo/"
TAGS = "tag/"
# Every tag again, under its digest, so a manifest's tags are found without reading the others.
TAGGED = "tagged/"
TAG_INDEX_BUILT = "store/tag-index"
# Rewritten in every transaction that changes a repository's tags, or adds a repository: nodes keep
# tag lists and the catalog in memory and check one of these per request to know they are current.
TAG_VERSIONS = "tagver/"
CATALOG_VERSION = "store/catalog-version"
MANIFESTS = "manifest/"
LINKS = "link/"
BLOBS = "blob/"
REFERRERS = "referrer/"
UPLOADS = "upload/"
UPLOAD_CLAIMS = "upload-claim/"
# Every open upload session again, under whoever opened it, so sessions per user are counted.
UPLOAD_OWNERS = "upload-owner/"
# Every session committing a digest again, under that digest, so a refused twin's reclaim finds the
# others without reading every session.
UPLOAD_COMMITS = "upload-commit/"
LEADER = "leader/"
TOUCHES = "touch/"
PENDING_BLOBS = "gc/pending-blob/"
PENDING_MANIFESTS = "gc/pending-manifest/"
DELETING = "gc/deleting/"
# What a deleted manifest (or tag) let go of, and when: GC need not wait out its grace for those.
RELEASED = "gc/released/"
GC_LAST_RUN = "gc/last-run"
GC_ORPHANS_LAST = "gc/orphans-last"
# Moved by a collection after it marks and before it deletes; very large manifest writes guard on it.
GC_EPOCH = "gc/epoch"
QUOTAS = "quota/"
RETENTION_LAST_RUN = "retention/last-run"
# The key that signs the web pages' sign-in cookies, made by the first node that needs it (unless
# http.secret is set), so a cookie made by one node is good on every node.
UI_SESSION_KEY = "ui/session-key"
# Which store this coordinator belongs to; the storage holds the same id (node/store.py).
STORE_IDENTITY = "store/identity"
# Adoption of a registry:2 store: pending, running (with its progress) or done.
IMPORT_STATE = "store/import"
# When `wharf export` last wrote registry:2's layout for a rollback (seconds since the epoch); gone
# once a later `wharf import` took registry:2's tree in again.
HANDOVER = "store/handover"
# The cluster-wide read-only switch (`wharf maintenance readonly on|off`), watched by every node.
READONLY = "maintenance/readonly"
# Notification events: written to the inbox in the transaction of the change they describe, moved
# in commit order to one queue per endpoint and repository partition, deleted once delivered.
NOTIFY = "notify/"
NOTIFY_INBOX = NOTIFY + "inbox/"
NOTIFY_QUEUES = NOTIFY + "queue/"
NOTIFY_SEQ = NOTIFY + "seq"
NOTIFY_STATUS = NOTIFY + "status/"
# When each manifest was last pulled, per repository; written in batches by every node (coordinator/pulls.py).
PULLED = "pulled/"
# Rewritten with every batch that moves a repository's last-pulled times, so nodes know a copy is current.
PULLED_VERSIONS = "pulledver/"
# Storage per repository and namespace (coordinator/usage.py). Every change to what a repository holds
# (a blob link, a manifest) writes a mark; a settler counts the marks into an object record per object
# (naming the repository, when one holds it; else a summary beside a holder record per repository holding
# it), and one counter per repository, namespace and the total.
USAGE = "usage/"
USAGE_MARKS = "usage/mark/"
USAGE_HOLDERS = "usage/holder/"
USAGE_OBJECTS = "usage/object/"
USAGE_SCOPES = "usage/scope/"
USAGE_TOTAL = "usage/total"
# Written once every link and manifest of the store has been marked (at its first start, or the first
# leader after an upgrade): from then on the counters are complete once the marks are settled.
USAGE_BUILT = "usage/built"
# Left by a whole-repository delete until it has marked what the repository held: one found later (its
# deleter died in between) has the settler check every holding against the records.
USAGE_RECOUNTS = "usage/recount/"
# A whole repository (or namespace, ending in '/') being deleted: pushes into it are refused meanwhile.
FENCES = "fence/"
# Present while a retention run is under way; left behind, it shows the next run one was cut short.
RETENTION_PROGRESS = "retention/progress"
# The newest line (number and hash) an audit log is known to have had, one record per chain.
AUDIT_HEADS = "audit/head/"
# The pull-through cache: when each cached tag was last confirmed by its upstream; claims on fetches
# in flight (one fetch per missing blob for the whole cluster, held with the fetching node's lease);
# hit and miss counts per upstream; the last eviction run per upstream.
CACHE = "cache/"
CACHE_TAGS = CACHE + "tag/"
CACHE_FETCHES = CACHE + "fetch/"
CACHE_STATS = CACHE + "stats/"
CACHE_EVICTIONS = CACHE + "evicted/"

# Regions (coordinator/replication.py). A region joins the store once its storage carries the store's
# identity. Where a blob's bytes are, region by region: `<digest>/<region>/<storage key>`, one record
# per object (a region may hold two: an upload's own key and the content-addressed one). One queue
# per target region of copies still to make; a copy under way is claimed with its node's lease.
REGIONS = "region/joined/"
REGION_COPIES = "region/copy/"
REPLICATION_QUEUE = "replicate/queue/"
REPLICATION_COPYING = "replicate/copying/"
REPLICATION_WORKERS = "replicate/worker/"


# Written first and removed last by a restore (coordinator/snapshot.py): while it is present the
# coordinator holds part of a snapshot, and the same snapshot may be restored again to finish.
RESTORING = "restore/in-progress"
# Records of processes at work, not of the registry: snapshots leave them out (with every key
# attached to a lease), and a restore leaves the coordinator's own alone.
# Notification queues are deliveries in flight: a restored snapshot must not send old events again.
EPHEMERAL = (LEADER, DELETING, RESTORING, NOTIFY, CACHE_FETCHES)


def ephemeral(key: str) -> bool:
    return key.startswith(EPHEMERAL)


def after(key: str) -> str:
    """The smallest key that sorts after `key` (for exclusive pagination starts)."""
    return key + "\0"


def repository(name: str) -> str:
    return f"{REPOSITORIES}{name}"


def tag(repo: str, tag: str) -> str:
    return f"{TAGS}{repo}@{tag}"


def tag_version(repo: str) -> str:
    return f"{TAG_VERSIONS}{repo}"


def tags_of(repo: str) -> str:
    return f"{TAGS}{repo}@"


def tagged(repo: str, digest: str, tag: str) -> str:
    return f"{TAGGED}{repo}@{digest}/{tag}"


def tags_of_digest(repo: str, digest: str) -> str:
    return f"{TAGGED}{repo}@{digest}/"


def manifest(repo: str, digest: str) -> str:
    return f"{MANIFESTS}{repo}@{digest}"


def manifests_of(repo: str) -> str:
    return f"{MANIFESTS}{repo}@"


def link(repo: str, digest: str) -> str:
    return f"{LINKS}{repo}@{digest}"


def links_of(repo: str) -> str:
    return f"{LINKS}{repo}@"


def blob(digest: str) -> str:
    return f"{BLOBS}{digest}"


def referrer(repo: str, subject: str, digest: str) -> str:
    return f"{REFERRERS}{repo}@{subject}/{digest}"


def referrers_of(repo: str, subject: str) -> str:
    return f"{REFERRERS}{repo}@{subject}/"


def referrers_in(repo: str) -> str:
    """Every referrer entry of one repository, whatever its subject."""
    return f"{REFERRERS}{repo}@"


def split_referrer_key(key: str) -> tuple[str, str, str]:
    """(repository, subject, referrer digest) of a referrer entry's key."""
    repo, _, rest = key[len(REFERRERS) :].rpartition("@")
    subject, _, digest = rest.partition("/")
    return repo, subject, digest


def upload(upload_id: str) -> str:
    return f"{UPLOADS}{upload_id}"


def uploads_of(owner: str) -> str:
    """`owner` is a user name or an address; quoted, so no character of it can end the prefix."""
    return f"{UPLOAD_OWNERS}{quote(owner, safe='')}/"


def upload_owner(owner: str, upload_id: str) -> str:
    return f"{uploads_of(owner)}{upload_id}"


def upload_commits_of(digest: str) -> str:
    return f"{UPLOAD_COMMITS}{digest}/"


def upload_commit(digest: str, upload_id: str) -> str:
    """Present while the session `upload_id` is committing `digest`."""
    return f"{upload_commits_of(digest)}{upload_id}"


def upload_claim(upload_id: str) -> str:
    """Held (with its node's lease) by the one request writing to an upload session."""
    return f"{UPLOAD_CLAIMS}{upload_id}"


def leader(job: str) -> str:
    return f"{LEADER}{job}"


def touch(digest: str) -> str:
    """When a client was last told this blob exists (garbage collection spares it a while)."""
    return f"{TOUCHES}{digest}"


def pending_blob(digest: str) -> str:
    """Garbage collection means to delete this blob; a push that uses it removes the mark."""
    return f"{PENDING_BLOBS}{digest}"


def pending_manifest(repo: str, digest: str) -> str:
    return f"{PENDING_MANIFESTS}{repo}@{digest}"


def deleting(digest: str) -> str:
    """The blob's records are gone and its storage object is being deleted."""
    return f"{DELETING}{digest}"


def released(repo: str, digest: str) -> str:
    """Manifest `digest` of `repo` was deleted (or untagged): what it used is not a push in flight."""
    return f"{RELEASED}{repo}@{digest}"


def split_repo_key(key: str, prefix: str) -> tuple[str, str]:
    """(repository, rest) of a `<prefix><repo>@<rest>` key (tags, manifests, links, released)."""
    repo, _, rest = key[len(prefix) :].rpartition("@")
    return repo, rest


def pulled(repo: str, digest: str) -> str:
    """When manifest `digest` of `repo` was last pulled."""
    return f"{PULLED}{repo}@{digest}"


def pulled_of(repo: str) -> str:
    return f"{PULLED}{repo}@"


def pulled_version(repo: str) -> str:
    return f"{PULLED_VERSIONS}{repo}"


# Marks name every holder of an object with this in place of a repository (no name contains '*').
EVERY_HOLDER = "*"


def usage_mark(digest: str, repo: str) -> str:
    """What `repo` holds of object `digest` changed (or, with EVERY_HOLDER, of every repository)."""
    return f"{USAGE_MARKS}{digest}/{repo}"


def split_usage_key(key: str, prefix: str) -> tuple[str, str]:
    """(digest, repository) of a usage mark or holder key."""
    digest, _, repo = key[len(prefix) :].partition("/")
    return digest, repo


def usage_holder(digest: str, repo: str) -> str:
    return f"{USAGE_HOLDERS}{digest}/{repo}"


def usage_holders_of(digest: str) -> str:
    return f"{USAGE_HOLDERS}{digest}/"


def usage_object(digest: str) -> str:
    return f"{USAGE_OBJECTS}{digest}"


def usage_scope(scope: str) -> str:
    """The counter of a repository, or of a namespace (`scope` ends with '/'); '' is the registry's total."""
    return f"{USAGE_SCOPES}{scope}" if scope else USAGE_TOTAL


def usage_recount(repo: str) -> str:
    return f"{USAGE_RECOUNTS}{repo}"


def fence(name: str) -> str:
    """Present while repository `name` (or namespace `name`, ending in '/') is being deleted."""
    return f"{FENCES}{name}"


def fences_of(repo: str) -> list[str]:
    """The fences that stop writes into `repo`: its own and each enclosing namespace's."""
    parts = repo.split("/")
    return [fence(repo), *(fence("/".join(parts[:i]) + "/") for i in range(1, len(parts)))]


def tagged_in(repo: str) -> str:
    """Every digest -> tag index entry of one repository."""
    return f"{TAGGED}{repo}@"


def pending_manifests_of(repo: str) -> str:
    return f"{PENDING_MANIFESTS}{repo}@"


def quota_guard(scope: str) -> str:
    """Rewritten by every new link under a quota scope, so concurrent admissions serialise."""
    return f"{QUOTAS}{scope}"


def audit_head(chain: str) -> str:
    """Where the audit chain `chain` records its newest line, so a truncated tail is noticed."""
    return f"{AUDIT_HEADS}{chain}"


def notify_inbox(event_id: str) -> str:
    return f"{NOTIFY_INBOX}{event_id}"


def _endpoint(name: str) -> str:
    return quote(name, safe="")


def notify_queue(endpoint: str) -> str:
    """Every queued event of one notification endpoint (all partitions)."""
    return f"{NOTIFY_QUEUES}{_endpoint(endpoint)}/"


def notify_partition(endpoint: str, partition: int) -> str:
    return f"{notify_queue(endpoint)}{partition:02d}/"


def notify_queued(endpoint: str, partition: int, seq: int) -> str:
    """One queued event; zero-padded so key order is delivery order."""
    return f"{notify_partition(endpoint, partition)}{seq:020d}"


def notify_status(endpoint: str) -> str:
    """How delivery to an endpoint last went (written by the delivering leader)."""
    return f"{NOTIFY_STATUS}{_endpoint(endpoint)}"


def cache_tag(repo: str, tag: str) -> str:
    """When the upstream last confirmed what a cached tag points at."""
    return f"{CACHE_TAGS}{repo}@{tag}"


def cache_blob_fetch(digest: str) -> str:
    """Held while one node fetches a blob from an upstream; the others wait for it to go."""
    return f"{CACHE_FETCHES}{digest}"


def cache_stats(upstream: str) -> str:
    """One upstream's counts (hits, misses, bytes ...), added to by every node."""
    return f"{CACHE_STATS}{quote(upstream, safe='')}"


def cache_eviction(upstream: str) -> str:
    return f"{CACHE_EVICTIONS}{quote(upstream, safe='')}"


def manifests_under(prefix: str) -> str:
    """Every manifest of every repository whose name starts with `prefix` (a namespace such as team/)."""
    return f"{MANIFESTS}{prefix}"


def links_under(prefix: str) -> str:
    return f"{LINKS}{prefix}"


def tags_under(prefix: str) -> str:
    return f"{TAGS}{prefix}"


def region(name: str) -> str:
    return f"{REGIONS}{name}"


def region_copies_of(digest: str) -> str:
    return f"{REGION_COPIES}{digest}/"


def region_copy(digest: str, region: str, storage_key: str) -> str:
    """Region names hold no '/', digests neither: the storage key is the rest, '/' and all."""
    return f"{region_copies_of(digest)}{region}/{storage_key}"


def split_region_copy(key: str) -> tuple[str, str, str]:
    """(digest, region, storage key) of a region copy record's key."""
    digest, region, storage_key = key[len(REGION_COPIES) :].split("/", 2)
    return digest, region, storage_key


def replication_queue(target: str) -> str:
    return f"{REPLICATION_QUEUE}{target}/"


def replication_queued(target: str, digest: str) -> str:
    """A copy of `digest` still to make into region `target`."""
    return f"{replication_queue(target)}{digest}"


def split_replication_queued(key: str) -> tuple[str, str]:
    """(target region, digest) of a queue entry's key."""
    target, _, digest = key[len(REPLICATION_QUEUE) :].partition("/")
    return target, digest


def replication_copying(digest: str, target: str) -> str:
    """Held (with its node's lease) while one worker copies `digest` into `target`."""
    return f"{REPLICATION_COPYING}{digest}/{target}"


def replication_workers(region: str) -> str:
    return f"{REPLICATION_WORKERS}{region}/"


def replication_worker(region: str, node: str) -> str:
    """Present (with its lease) while a node of `region` copies out of it: bandwidth is shared by them."""
    return f"{replication_workers(region)}{quote(node, safe='')}"


# -- a key's stored form in the compact layout -------------------------------------------------
#
# Most of a coordinator's bytes are keys, and most of a key's bytes are digests in hex. A store in the
# compact layout (the etcd backend gives every store it creates this layout; one created earlier keeps
# the text layout, and both read) stores each `sha256:<64 hex>` of a key as one byte (SHA256_MARK)
# and the digest's 32 raw bytes: 33 bytes for 71. Raw bytes sort as their hex does, so ranges keep
# their order; a range's prefix never ends inside a digest. No key built here contains SHA256_MARK.
# Every stored key of the compact layout starts with COMPACT_LAYOUT, which no key of the text layout
# starts with: a store's layout shows in its keys, and a Wharf version that knows only the text
# layout finds such a coordinator empty (and so refuses a used store rather than touch it).

SHA256_MARK = 0x01
COMPACT_LAYOUT = b"\x02"
_SHA256 = "sha256:"


def pack(key: str) -> bytes:
    """`key` as the compact layout stores it."""
    if "\x01" in key:
        raise ValueError(f"a coordinator key cannot contain the byte 0x01: {key!r}")
    at = key.find(_SHA256)
    if at < 0:
        return key.encode("utf-8", "surrogateescape")
    out = bytearray()
    done = 0
    while at >= 0:
        hexdigits = key[at + 7 : at + 71]
        try:
            raw = bytes.fromhex(hexdigits) if len(hexdigits) == 64 else b""
        except ValueError:
            raw = b""
        # Only 64 lowercase hex digits (bytes.fromhex takes capitals and spaces too) are a digest here.
        if len(raw) == 32 and raw.hex() == hexdigits:
            out += key[done:at].encode("utf-8", "surrogateescape")
            out.append(SHA256_MARK)
            out += raw
            done = at + 71
            at = key.find(_SHA256, done)
        else:
            at = key.find(_SHA256, at + 1)
    out += key[done:].encode("utf-8", "surrogateescape")
    return bytes(out)


def unpack(raw: bytes) -> str:
    """The key a compact layout's stored `raw` is."""
    at = raw.find(SHA256_MARK)
    if at < 0:
        return raw.decode("utf-8", "surrogateescape")
    parts = []
    done = 0
    while at >= 0:
        if at + 33 > len(raw):
            raise ValueError(f"a stored key ends inside a digest: {raw!r}")
        parts.append(raw[done:at].decode("utf-8", "surrogateescape"))
        parts.append(_SHA256 + raw[at + 1 : at + 33].hex())
        done = at + 33
        at = raw.find(SHA256_MARK, done)
    parts.append(raw[done:].decode("utf-8", "surrogateescape"))
    return "".join(parts)
