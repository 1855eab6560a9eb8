# The two commands of the README quick start.
#   make dev    build and run the whole pipeline locally (Ctrl-C stops it)
#   make test   install test dependencies and run every check and test
#   make bench  receiver throughput against DCMTK storescp and Orthanc (docs/benchmarks.md)
#   make bench-uploader  archive + upload of a 1 GiB study against 7z + the aws CLI

CARGO ?= cargo
# Python tools (DataLad and its git-annex special remotes) from ./.venv when
# scripts/install-deps.sh had to make one (Debian's externally managed Python).
export PATH := $(CURDIR)/.venv/bin:$(PATH)
export BIDSFLUX_VENV_BIN := $(CURDIR)/.venv/bin

.PHONY: dev test deps-run deps-test lint build bench bench-memory bench-uploader

dev: deps-run
	$(CARGO) build --bin bidsflux-dev
	exec "$${CARGO_TARGET_DIR:-target}/debug/bidsflux-dev"

test: deps-test
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --workspace --no-deps --document-private-items --locked
	bash stack/check.sh
# Every binary, also those of packages without tests of their own (bidsflux-s3-dev, which the
# deploy test puts in an image): cargo test builds only the tested packages' binaries.
	$(CARGO) build --workspace --bins --locked
	$(CARGO) test --workspace --locked --no-fail-fast

deps-run:
	@bash scripts/install-deps.sh run

deps-test:
	@bash scripts/install-deps.sh test

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --workspace --no-deps --document-private-items

build:
	$(CARGO) build --workspace --bins

bench:
	bash bench/receiver.sh

bench-memory:
	$(CARGO) build --release --workspace --bins
	$(CARGO) bench -p bidsflux-e2e --bench memory

bench-uploader:
	@command -v aws >/dev/null || python3 -m pip install --quiet awscli
	$(CARGO) bench -p bidsflux-uploader --bench archive_upload
