# molt: make build | run | test | lint
GO       ?= go
VERSION  ?= $(shell git describe --always --dirty --tags 2>/dev/null || echo dev)
LDFLAGS  := -X main.buildVersion=$(VERSION)
# Integration tests start many processes; on 2 shared cores a low
# parallelism keeps race-built masters from starving each other. Most of
# a test's time is waiting (probations, deadlines, settle windows): at
# -parallel 2 the cores were half idle, at 3 they still are a third.
TESTFLAGS ?= -race -count=1 -timeout 20m -parallel 3

.PHONY: build run test lint fmt clean fuzz soak bench

build:
	$(GO) build -ldflags "$(LDFLAGS)" -o bin/molt ./cmd/molt

# The built-in demo on 127.0.0.1:8080 with 2 workers; Ctrl-C stops it.
run: build
	./bin/molt run --listen 127.0.0.1:8080 --workers 2

test:
	MOLT_TEST_VERSION=$(VERSION) $(GO) test $(TESTFLAGS) ./...

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

fmt:
	gofmt -w $$(git ls-files '*.go')

clean:
	rm -rf bin

# Fuzz every parser of outside input for FUZZTIME each (not in make test).
FUZZTIME ?= 30s
FUZZ_TARGETS := \
	./master/internal/notify:FuzzParseDatagram \
	./worker:FuzzParseNotify \
	./worker:FuzzParseFDNames \
	./worker:FuzzParseStats \
	./master:FuzzParseCtlRequest \
	./master:FuzzParseListen \
	./upgrade:FuzzDecodeMsg \
	./cmd/molt:FuzzConfigFile

fuzz:
	@set -e; for t in $(FUZZ_TARGETS); do \
		pkg=$${t%%:*}; fn=$${t##*:}; \
		echo "== $$fn ($$pkg, $(FUZZTIME))"; \
		$(GO) test -run '^$$' -fuzz "^$$fn$$" -fuzztime $(FUZZTIME) $$pkg; \
	done

# The long versions of the repeated tests (not in make test): 1,000
# upgrades and 10,000 worker restarts under load, without -race.
SOAK_UPGRADES ?= 1000
SOAK_RESTARTS ?= 10000
soak:
	MOLT_TEST_VERSION=$(VERSION) MOLT_SOAK_UPGRADES=$(SOAK_UPGRADES) MOLT_SOAK_RESTARTS=$(SOAK_RESTARTS) \
		$(GO) test -count=1 -timeout 180m -v -run '^(TestUpgrade_RepeatedUpgradesUnderLoad|TestFaults_WorkerRestartsLeaveTheMasterFlat)$$' ./integration

# Measure molt with molt drill and write test/bench/RESULTS.md (about 10
# minutes; server pinned to one CPU, load to another; not in make test).
bench: build
	$(GO) run ./test/bench -molt bin/molt -out test/bench/RESULTS.md
