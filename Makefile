# Every target builds .venv from pyproject.toml first, so a fresh clone needs
# nothing but python3 (3.11+) and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test results bench chaos soak clean posix dst mutants seeds fsx

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/cleanlease simulate --workload read-mostly --guests 3 --duration 5 --seed 1

# Three seeds each, every fault class in each (docs/reliability.md, "make chaos"): the
# library guests' and the peers' faults, then the mounted guests'.  Both run whatever
# the first found; exits 1 if any seed of either broke a promise.
chaos: $(STAMP)
	$(BIN)/python -m workload.chaos --seeds 1,2,3 --duration 20; peers=$$?; \
	$(BIN)/cleanlease chaos-mount --seeds 1,2,3 --duration 20; mounts=$$?; \
	test $$peers -eq 0 -a $$mounts -eq 0

# pjdfstest (../shared/thirdparty, built under build/thirdparty) on plain ext4 and on a
# clean-lease mount, side by side: files/tests/failed for both and the files failing only
# on the mount (docs/mount.md, "POSIX").  Needs root and /dev/fuse; exits 1 if any file
# passes on ext4 but not on the mount.
posix: $(STAMP)
	$(BIN)/python -m workload.posix

# fsx (../shared/thirdparty) in its default mode, mapped reads and writes on, on a
# clean-lease mount: 100,000 operations on each of 3 seeds, plain ext4 first as a
# control (docs/mount.md, "Shared writable mappings").  FSX_ARGS="--policies never,always".
fsx: $(STAMP)
	$(BIN)/python -m workload.fsx $(FSX_ARGS)

# The deterministic simulator (docs/simulation.md): 10,000 seeded schedules of the real
# host and guest code on virtual time, on 2 processes.
dst: $(STAMP)
	$(BIN)/cleanlease dst --seeds 10000 --jobs 2

# Each patch in tests/mutants/ removes one safety step; for each, the first seed (of up
# to 10,000) whose schedule catches it, and the invariant it broke.
mutants: $(STAMP)
	$(BIN)/python -m workload.dst.mutants --max-seeds 10000 --jobs 2

results: $(STAMP)
	$(BIN)/cleanlease results

# Each attack of issue 13 against a real daemon while good guests read and write
# (docs/reliability.md, "make soak"): about 2.5 minutes; exits 1 if a promise breaks.
soak: $(STAMP)
	$(BIN)/python -m benchmarks.soak --duration 8

# Issue 16's figures (docs/seeds.md): freeze latency against busy writers and file size,
# thaw, full vs incremental backup of a 1 GiB file (1/10/50 % changed), an incremental backup
# under host-local and guest writers checked byte for byte against a snapshot, and stores
# through shared mappings.  Needs root and fanotify pre-content events; a few minutes.
seeds: $(STAMP)
	mkdir -p build
	$(BIN)/python -m benchmarks.seeds --size-mib 1024 --json build/seeds.json | tee build/seeds.md

test: $(STAMP) fio-deps
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# fio, for the verify run in tests/test_mount.py (Debian's package; needs root).
# Where it cannot be installed, that one test skips and says why.
.PHONY: fio-deps
fio-deps:
	@command -v fio >/dev/null || (apt-get update -qq && apt-get install -y -qq fio >/dev/null) \
	  || echo "fio could not be installed: tests/test_mount.py's fio run will skip"

# Two groups: the protocol and daemon figures (`cleanlease bench`, about 40 s), then
# the "mount" group (benchmarks/mount_group.py, about 5 minutes: fio, git clone, tar
# and a warm git status on ext4, libfuse's passthrough_ll and a clean-lease mount, as
# ratios; it installs libfuse3-dev and fio where missing, and skips with the reason
# where it cannot mount).  `make bench-mount` runs the second alone.
.PHONY: bench-mount
bench: $(STAMP) fio-deps
	$(BIN)/cleanlease bench
	$(BIN)/python -m benchmarks.mount_group

bench-mount: $(STAMP) fio-deps
	$(BIN)/python -m benchmarks.mount_group
