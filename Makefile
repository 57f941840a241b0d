# molt: make build | run | test | lint
GO       ?= go
VERSION  ?= $(shell git describe --always --dirty --tags 2>/dev/null || echo dev)
LDFLAGS  := -X main.buildVersion=$(VERSION)
# Integration tests start many processes; on 2 shared cores a low
# parallelism keeps race-built masters from starving each other.
TESTFLAGS ?= -race -count=1 -timeout 20m -parallel 2

.PHONY: build run test lint fmt clean

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
