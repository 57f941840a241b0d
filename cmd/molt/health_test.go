package main

import (
	"strings"
	"testing"
	"time"
)

func TestConfigFile_HealthCheckKeys(t *testing.T) {
	path := writeConfig(t, `
health_check         = "/healthz"
health_check_cmd     = "test -e /proc/$MOLT_WORKER_PID"
health_check_timeout = "2s"
`)
	f, _, err := parseWith(t, []string{"--config", path, "--health-check-timeout", "3s"})
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := f.config([]string{"/bin/true"})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.HealthCheck != "/healthz" || cfg.HealthCheckCmd != "test -e /proc/$MOLT_WORKER_PID" || cfg.HealthCheckTimeout != 3*time.Second {
		t.Errorf("health check settings: %q %q %v", cfg.HealthCheck, cfg.HealthCheckCmd, cfg.HealthCheckTimeout)
	}
	// Off by default.
	f, _, _ = parseWith(t, nil)
	if cfg, err := f.config([]string{"/bin/true"}); err != nil || cfg.HealthCheck != "" || cfg.HealthCheckCmd != "" {
		t.Errorf("default: %q %q %v", cfg.HealthCheck, cfg.HealthCheckCmd, err)
	}
	_, _, err = parseWith(t, []string{"--config", writeConfig(t, "health_check_timeout = \"0s\"\n")})
	if err == nil || !strings.Contains(err.Error(), "health_check_timeout") {
		t.Errorf("a zero timeout in the file: %v", err)
	}
}
