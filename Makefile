# bcemb — `make help` lists the targets.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
JAR_CACHE ?= $(HOME)/.cache/bcemb/jars
# the object-store emulators tests/test_azure_gcs.py starts (`make emulators`)
EMULATORS ?= $(HOME)/.cache/bcemb
AZURITE_VERSION ?= 3.37.0
FAKE_GCS_VERSION ?= v1.56.1
CONFIG ?= conf/local.yaml
# the Spark/Delta pair CI runs on (pyproject.toml allows ranges); override to test another pair
TESTED_PYSPARK ?= 4.2.0
TESTED_DELTA ?= 4.4.0
EXTRAS ?= dev,bench,torch,report,arrow,docs,connect
export OPENBLAS_NUM_THREADS ?= 1

.DEFAULT_GOAL := help
.PHONY: help install jars s3a-jars abfs-jars gcs-jars emulators test-deps dist demo test test-fast bench-fit bench-backfill bench-paper clean docs-config docs

help: ## list the targets with their one-line descriptions
	@grep -E '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-16s %s\n", $$1, $$2}'

install: ## pip-install bcemb (all extras) with the tested Spark/Delta pair into the current Python, then cache the Delta jars
	$(PIP) install --quiet --disable-pip-version-check -e ".[$(EXTRAS)]" "pyspark==$(TESTED_PYSPARK)" "delta-spark==$(TESTED_DELTA)"
	@$(MAKE) --no-print-directory jars

jars: ## fetch the Delta jars matching delta-spark into $(JAR_CACHE) with mvn (else Spark falls back to Ivy)
	@coords=$$($(PYTHON) -c "from bclib.spark import delta_maven_coordinates as c; print(' '.join(c()))"); \
	names=$$($(PYTHON) -c "from bclib.spark import delta_jar_names as n; print(' '.join(n()))"); \
	missing=0; for n in $$names; do [ -f "$(JAR_CACHE)/$$n" ] || missing=1; done; \
	if [ $$missing = 0 ]; then echo "Delta jars cached in $(JAR_CACHE)"; exit 0; fi; \
	if ! command -v mvn >/dev/null; then echo "mvn not found: Spark will resolve the Delta jars through Ivy"; exit 0; fi; \
	for c in $$coords; do \
	  mvn -q -B dependency:copy -Dartifact=$$c -DoutputDirectory="$(JAR_CACHE)" \
	    || { echo "mvn could not fetch $$c: Spark will resolve the Delta jars through Ivy"; exit 0; }; \
	done; echo "Delta jars cached in $(JAR_CACHE)"
	@$(MAKE) --no-print-directory s3a-jars

s3a-jars: ## fetch Spark's S3A connector (hadoop-aws + the AWS SDK v2 modules it uses) into $(JAR_CACHE)/s3a with mvn
	@if ls "$(JAR_CACHE)/s3a/hadoop-aws-"*.jar >/dev/null 2>&1; then echo "S3A jars cached in $(JAR_CACHE)/s3a"; exit 0; fi; \
	if ! command -v mvn >/dev/null; then echo "mvn not found: no S3A jars (s3a:// tables need them)"; exit 0; fi; \
	rm -rf "$(JAR_CACHE)/s3a.partial"; mvn -q -B -f conf/s3a-connector.pom.xml dependency:copy-dependencies -DincludeScope=runtime \
	  -DoutputDirectory="$(JAR_CACHE)/s3a.partial" && mv "$(JAR_CACHE)/s3a.partial" "$(JAR_CACHE)/s3a" \
	  && echo "S3A jars cached in $(JAR_CACHE)/s3a" || { rm -rf "$(JAR_CACHE)/s3a.partial"; echo "mvn could not fetch the S3A jars"; }

abfs-jars: ## fetch Spark's Azure connector (hadoop-azure 3.5.0: ABFS and WASB) into $(JAR_CACHE)/abfs with mvn
	@if ls "$(JAR_CACHE)/abfs/hadoop-azure-"*.jar >/dev/null 2>&1; then echo "ABFS jars cached in $(JAR_CACHE)/abfs"; exit 0; fi; \
	if ! command -v mvn >/dev/null; then echo "mvn not found: no ABFS jars (abfs:// tables need them)"; exit 0; fi; \
	rm -rf "$(JAR_CACHE)/abfs.partial"; mvn -q -B -f conf/abfs-connector.pom.xml dependency:copy-dependencies -DincludeScope=runtime \
	  -DoutputDirectory="$(JAR_CACHE)/abfs.partial" && mv "$(JAR_CACHE)/abfs.partial" "$(JAR_CACHE)/abfs" \
	  && echo "ABFS jars cached in $(JAR_CACHE)/abfs" || { rm -rf "$(JAR_CACHE)/abfs.partial"; echo "mvn could not fetch the ABFS jars"; }

gcs-jars: ## fetch Spark's GCS connector (gcs-connector 4.0.4, shaded) into $(JAR_CACHE)/gcs with mvn
	@if ls "$(JAR_CACHE)/gcs/gcs-connector-"*.jar >/dev/null 2>&1; then echo "GCS jars cached in $(JAR_CACHE)/gcs"; exit 0; fi; \
	if ! command -v mvn >/dev/null; then echo "mvn not found: no GCS connector (gs:// tables need it)"; exit 0; fi; \
	rm -rf "$(JAR_CACHE)/gcs.partial"; mvn -q -B -f conf/gcs-connector.pom.xml dependency:copy-dependencies -DincludeScope=runtime \
	  -DoutputDirectory="$(JAR_CACHE)/gcs.partial" && mv "$(JAR_CACHE)/gcs.partial" "$(JAR_CACHE)/gcs" \
	  && echo "GCS jars cached in $(JAR_CACHE)/gcs" || { rm -rf "$(JAR_CACHE)/gcs.partial"; echo "mvn could not fetch the GCS connector"; }

emulators: ## install Azurite (npm) and fake-gcs-server (go install) into $(EMULATORS) for tests/test_azure_gcs.py
	@if [ "$$(cat "$(EMULATORS)/azurite/node_modules/azurite/package.json" 2>/dev/null | grep -m1 '"version"')" \
	  = '  "version": "$(AZURITE_VERSION)",' ]; then echo "Azurite $(AZURITE_VERSION) in $(EMULATORS)/azurite"; \
	elif ! command -v npm >/dev/null; then echo "npm not found: no Azurite (the abfs:// test skips)"; \
	else npm install --silent --no-audit --no-fund --prefix "$(EMULATORS)/azurite" "azurite@$(AZURITE_VERSION)" \
	  && echo "Azurite $(AZURITE_VERSION) in $(EMULATORS)/azurite" || echo "npm could not install Azurite"; fi
	@if [ -x "$(EMULATORS)/bin/fake-gcs-server" ] && go version -m "$(EMULATORS)/bin/fake-gcs-server" 2>/dev/null \
	  | grep -q "mod.*fake-gcs-server.*$(FAKE_GCS_VERSION)"; then echo "fake-gcs-server $(FAKE_GCS_VERSION) in $(EMULATORS)/bin"; \
	elif ! command -v go >/dev/null; then echo "go not found: no fake-gcs-server (the gs:// test skips)"; \
	else GOBIN="$(EMULATORS)/bin" go install "github.com/fsouza/fake-gcs-server@$(FAKE_GCS_VERSION)" \
	  && echo "fake-gcs-server $(FAKE_GCS_VERSION) in $(EMULATORS)/bin" || echo "go could not build fake-gcs-server"; fi

docs-config: ## regenerate docs/config.md (every config key) from bclib/config.py
	$(PYTHON) -m bclib.config_reference

docs: ## build the docs site into site/ with mkdocs build --strict (pages: docs/, nav: mkdocs.yml)
	NO_MKDOCS_2_WARNING=1 $(PYTHON) -m mkdocs build --strict --site-dir site

dist: ## zip the library for spark-submit --py-files (dist/bclib.zip)
	$(PYTHON) -c "import shutil; shutil.make_archive('dist/bclib', 'zip', root_dir='.', base_dir='bclib')"

demo: install ## set up, then run the whole demo (generate, fit, backfill, evaluate) on the embedded default
	$(PYTHON) -m bclib.cli demo --config $(CONFIG)

# two workers (pytest-xdist, one Spark session each; a file's tests stay on one worker so module fixtures are
# built once), a random test order (pytest-randomly) from SEED, printed first (replay an order: make test SEED=N;
# file order: make test PYTEST_ARGS="-n 2 --dist loadfile -p no:randomly"), the 15 slowest tests at the end
ifndef SEED
SEED := $(shell $(PYTHON) -c "import random; print(random.randrange(10**6))")
endif
PYTEST_ARGS ?= -n 2 --dist loadfile --no-loadscope-reorder --durations=15 -p randomly --randomly-seed=$(SEED)

# what only the tests need (the Azure and GCS connectors and emulators): fetched by the test targets, not by install
test-deps:
	@$(MAKE) --no-print-directory abfs-jars gcs-jars emulators

test: install test-deps ## the full test suite (what CI runs): two workers, random order, seed printed
	@echo "test order: random, seed $(SEED) (replay: make test SEED=$(SEED))"
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

test-fast: install test-deps ## the suite without tests marked slow
	@echo "test order: random, seed $(SEED) (replay: make test-fast SEED=$(SEED))"
	$(PYTHON) -m pytest -q $(PYTEST_ARGS) -m "not slow"

bench-fit: install ## transform family x objective quality on the demo data (benchmarks/fit_quality.py)
	$(PYTHON) benchmarks/fit_quality.py

bench-backfill: install ## backfill throughput vs an identity Delta copy (benchmarks/backfill_throughput.py)
	$(PYTHON) benchmarks/backfill_throughput.py

bench-paper: install ## the paper's protocol on MovieLens (benchmarks/paper_movielens.py)
	$(PYTHON) benchmarks/paper_movielens.py

clean: ## remove local tables, reports and caches of this checkout
	rm -rf warehouse reports spark-warehouse metastore_db derby.log .pytest_cache
