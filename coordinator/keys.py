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
# Which store this coordinator belongs to; the storage holds the same id (node/store.py).
STORE_IDENTITY = "store/identity"
# Adoption of a registry:2 store: pending, running (with its progress) or done.
IMPORT_STATE = "store/import"
# The cluster-wide read-only switch (`wharf maintenance readonly on|off`), watched by every node.
READONLY = "maintenance/readonly"
# Notification events: written to the inbox in the transaction of the change they describe, moved
# in commit order to one queue per endpoint and repository partition, deleted once delivered.
NOTIFY = "notify/"
NOTIFY_INBOX = NOTIFY + "inbox/"
NOTIFY_QUEUES = NOTIFY + "queue/"
NOTIFY_SEQ = NOTIFY + "seq"
NOTIFY_STATUS = NOTIFY + "status/"
# Present while a retention run is under way; left behind, it shows the next run one was cut short.
RETENTION_PROGRESS = "retention/progress"
# The newest line (number and hash) an audit log is known to have had, one record per chain.
AUDIT_HEADS = "audit/head/"


# Written first and removed last by a restore (coordinator/snapshot.py): while it is present the
# coordinator holds part of a snapshot, and the same snapshot may be restored again to finish.
RESTORING = "restore/in-progress"
# Records of processes at work, not of the registry: snapshots leave them out (with every key
# attached to a lease), and a restore leaves the coordinator's own alone.
# Notification queues are deliveries in flight: a restored snapshot must not send old events again.
EPHEMERAL = (LEADER, DELETING, RESTORING, NOTIFY)


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
