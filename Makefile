# The README's two commands: `make run` and `make test`. `make bench` compares with Distribution.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# ansible, ansible-lint, supervisor and python3-venv: the ansible/ roll-out tests (tests/test_ansible.py);
# chromium: the web pages in a real browser (tests/test_ui_browser.py).
DEB_TEST_PACKAGES := etcd-server etcd-client skopeo docker-registry wrk apache2-utils haproxy podman ansible ansible-lint supervisor python3-venv chromium
# Ceph RADOS Gateway for the S3 tests (mon, OSD, radosgw), installed without the packages they recommend.
DEB_TEST_PACKAGES_NO_RECOMMENDS := ceph-mon ceph-osd radosgw ceph-common
CONFIG ?=
# Processes `make test` runs the suite in. Most tests wait on real servers (etcd, RGW, registry:2,
# ansible), so two cut the time by a third on two cores; each test file stays in one process (its
# module fixtures, such as the Ansible cluster, are built once), and files go out in their order
# (xdist would send those with the most tests first, leaving the slow few-test ones for the end).
TEST_WORKERS ?= 2

.PHONY: run test bench bench-hotpaths profile bench-s3 bench-chunked bench-gc bench-scale bench-signatures bench-proxy bench-metadata bench-ui install install-test deb-test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test deb-test

# Debian packages the tests start for real: etcd, skopeo, the reference registry, wrk, Ceph RGW, ansible.
deb-test:
	@missing=""; for p in $(DEB_TEST_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	bare=""; for p in $(DEB_TEST_PACKAGES_NO_RECOMMENDS); do dpkg -s $$p >/dev/null 2>&1 || bare="$$bare $$p"; done; \
	if [ -n "$$missing$$bare" ]; then \
		echo "installing Debian packages:$$missing$$bare"; \
		apt-get update -qq || exit 1; \
		if [ -n "$$missing" ]; then DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null || exit 1; fi; \
		if [ -n "$$bare" ]; then DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$bare >/dev/null || exit 1; fi; \
	fi

run: install
	$(VENV)/bin/wharf serve $(CONFIG)

test: install-test
	$(PY) -m ruff check node coordinator tests loadtests
	$(PY) -m mypy node coordinator
	$(PY) -m pytest -q -ra --durations=15 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# Extra flags for the comparison, e.g. `make bench BENCH_ARGS=--quick` (see loadtests/README.md).
BENCH_ARGS ?=

bench: install-test
	$(PY) loadtests/bench.py $(BENCH_ARGS)

# The same loads on S3 (moto) + etcd, and one node against three behind HAProxy (needs haproxy).
bench-s3: install-test
	$(PY) loadtests/bench_s3.py $(BENCH_ARGS)

# Chunked PATCH uploads (1 MiB, 5 MiB, odd) against one monolithic PUT on moto and Ceph RGW, beside Distribution.
bench-chunked: install-test
	$(PY) loadtests/bench_chunked.py $(BENCH_ARGS)

# One GC cycle over 10,000 manifests / 50,000 blobs, and pushes with and without GC running.
bench-gc: install-test
	$(PY) loadtests/bench_gc.py $(BENCH_ARGS)

# Manifest GET with a signature policy against without, on one node, in the same run.
bench-signatures: install-test
	$(PY) loadtests/bench_signatures.py $(BENCH_ARGS)

# A cached pull through Wharf against the upstream itself and Distribution in proxy mode.
bench-proxy: install-test
	$(PY) loadtests/bench_proxy.py $(BENCH_ARGS)

# The hot paths (manifest GET/HEAD, tag list, small-image push, blob pull, memory) beside Distribution,
# on the filesystem and Ceph RGW, in rounds, with a PASS/MISS line per goal.
bench-hotpaths: install-test
	$(PY) loadtests/bench_hotpaths.py --storage filesystem,rgw $(BENCH_ARGS)

# A flame graph and a top-frames table of one hot path: make profile OP=manifest-get (see loadtests/profile.py).
OP ?= manifest-get
profile: install-test
	$(PY) loadtests/profile.py $(OP) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) wharf-data

# Server CPU per push, tag list and delete at 0, 5,000 and 20,000 tags; embedded and etcd, quotas on and off.
bench-scale: install-test
	$(PY) loadtests/bench_scale.py $(BENCH_ARGS)

# Coordinator bytes per image (JSON records before, compact now) at 200,000 images, and what 8 GiB of etcd holds.
bench-metadata: install-test
	$(PY) loadtests/bench_metadata.py $(BENCH_ARGS)

bench-ui: install-test
	$(PY) loadtests/bench_ui.py $(BENCH_ARGS)
