package test

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"sync"
)

// Build builds each package (value) into dir/name (key), with -race when
// the test binary is race-built and with version as molt's build version.
// It runs from the module root (found from the working directory) and
// returns the compiler's output in the error.
func Build(dir, version string, pkgs map[string]string) error {
	return BuildTags(dir, version, "", pkgs)
}

// BuildTags is Build with the build tags tags (comma-separated; "" for
// none), e.g. "moltfault" for the faults a test injects into molt. The
// packages are built concurrently (each is one go build; the build cache
// is shared and safe for concurrent use); Build and BuildTags may run
// concurrently too.
func BuildTags(dir, version, tags string, pkgs map[string]string) error {
	root, err := moduleRoot()
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	names := make([]string, 0, len(pkgs))
	for n := range pkgs {
		names = append(names, n)
	}
	sort.Strings(names)
	errs := make([]error, len(names))
	var wg sync.WaitGroup
	for i, name := range names {
		args := []string{"build", "-o", filepath.Join(dir, name), "-ldflags", "-X main.buildVersion=" + version}
		if RaceEnabled {
			args = append(args, "-race")
		}
		if tags != "" {
			args = append(args, "-tags", tags)
		}
		args = append(args, pkgs[name])
		wg.Go(func() {
			cmd := exec.Command("go", args...)
			cmd.Dir = root
			if out, err := cmd.CombinedOutput(); err != nil {
				errs[i] = fmt.Errorf("go %v: %w\n%s", args, err, out)
			}
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}

// moduleRoot walks up from the working directory to the go.mod.
func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("no go.mod above the working directory")
		}
		dir = parent
	}
}
