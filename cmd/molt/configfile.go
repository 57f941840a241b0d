package main

import (
	"errors"
	"flag"
	"fmt"
	"math/big"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/hcl/v2"
	"github.com/hashicorp/hcl/v2/hclparse"
	"github.com/molt-server/molt/master"
	"github.com/zclconf/go-cty/cty"
)

// The config file (molt run --config FILE) is HCL: one attribute per
// flag, named as the flag with '_' for '-', plus command. HCL was chosen
// because it fits the HashiCorp stack molt already uses (go-hclog), its
// parser reports every problem with file:line:column and suggests the
// key meant for a misspelt one, and it reads well for operators:
//
//	listen  = ["web=:8080", "admin=unix:/run/app/admin.sock"]
//	workers = 4
//	ready_timeout = "20s"
//	env     = { APP_ENV = "production" }
//	pass_env = ["DATABASE_URL"] // molt's own values, as --env NAME
//	command = ["/srv/app/current/app", "--port-from-fd"]
//
// A flag given on the command line overrides the file.

// keyKind is the HCL type a key takes.
type keyKind int

const (
	kindString keyKind = iota
	kindInt
	kindBool
	kindStrings // a list of strings (or one string)
	kindMap     // an object of strings
	kindNumber  // a number, whole or not
)

// fileKeys are the keys a config file may set.
var fileKeys = map[string]keyKind{
	"listen": kindStrings, "socket_mode": kindString, "workers": kindInt, "pid_file": kindString,
	"control_socket": kindString, "metrics_listen": kindString, "log_file": kindString, "log_level": kindString, "log_json": kindBool,
	"ready": kindString, "ready_timeout": kindString, "drain_timeout": kindString,
	"worker_stop_signal": kindString, "probation": kindString, "stable_after": kindString, "commit": kindString, "watchdog": kindString, "max_worker_lifetime": kindString,
	"user": kindString, "group": kindString, "chdir": kindString, "env": kindMap, "pass_env": kindStrings,
	"worker_log": kindString, "allow_new_privs": kindBool,
	"umask": kindString, "backlog": kindInt, "command": kindStrings,
	"max_error_rate": kindString, "max_latency_factor": kindNumber, "min_requests": kindInt, "canary": kindInt,
	"health_check": kindString, "health_check_cmd": kindString, "health_check_timeout": kindString,
}

// configError lists every problem of a config file, one per line, each as
// FILE:LINE:COL: message.
type configError struct{ problems []string }

func (e *configError) Error() string { return strings.Join(e.problems, "\n") }

// applyConfigFile sets in fs every flag that path sets and the command
// line did not, and returns the file's command (nil if it has none). All
// problems are reported together.
func applyConfigFile(path string, fs *flag.FlagSet) ([]string, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("config file: %w", err)
	}
	if fi.IsDir() {
		return nil, fmt.Errorf("config file %s is a directory", path)
	}
	file, diags := hclparse.NewParser().ParseHCLFile(path)
	errs := &configError{}
	errs.add(diags)
	if file == nil {
		return nil, errs
	}
	schema := &hcl.BodySchema{}
	for k := range fileKeys {
		schema.Attributes = append(schema.Attributes, hcl.AttributeSchema{Name: k})
	}
	sort.Slice(schema.Attributes, func(i, j int) bool { return schema.Attributes[i].Name < schema.Attributes[j].Name })
	content, diags := file.Body.Content(schema)
	errs.add(diags)
	onCommandLine := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { onCommandLine[f.Name] = true })
	var command []string
	for _, name := range sortedKeys(content.Attributes) {
		attr := content.Attributes[name]
		values, err := attrValues(attr, fileKeys[name])
		if err == nil && name == "command" {
			command = values
			continue
		}
		if err == nil {
			err = setFlag(fs, name, values, onCommandLine)
		}
		if err != nil {
			errs.at(attr.Expr.Range(), name+": "+err.Error())
		}
	}
	if len(errs.problems) > 0 {
		return nil, errs
	}
	return command, nil
}

func (e *configError) add(diags hcl.Diagnostics) {
	for _, d := range diags {
		if d.Severity != hcl.DiagError {
			continue
		}
		msg := d.Summary
		if d.Detail != "" {
			msg += ": " + d.Detail
		}
		if d.Subject != nil {
			e.at(*d.Subject, msg)
		} else {
			e.problems = append(e.problems, msg)
		}
	}
}

func (e *configError) at(r hcl.Range, msg string) {
	e.problems = append(e.problems, fmt.Sprintf("%s:%d:%d: %s", r.Filename, r.Start.Line, r.Start.Column, msg))
}

func sortedKeys(m hcl.Attributes) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// attrValues evaluates a (constant) attribute as the strings its flag
// takes: one for scalars, several for lists, KEY=VALUE for maps.
func attrValues(attr *hcl.Attribute, kind keyKind) ([]string, error) {
	v, diags := attr.Expr.Value(nil)
	if diags.HasErrors() {
		return nil, errors.New("must be a constant value (no variables or functions)")
	}
	if v.IsNull() || !v.IsKnown() {
		return nil, errors.New("must not be null")
	}
	t := v.Type()
	switch kind {
	case kindString:
		if t != cty.String {
			return nil, errors.New("want a string")
		}
		return []string{v.AsString()}, nil
	case kindInt:
		if t != cty.Number {
			return nil, errors.New("want a number")
		}
		i, acc := v.AsBigFloat().Int64()
		if acc != big.Exact {
			return nil, errors.New("want a whole number")
		}
		return []string{strconv.FormatInt(i, 10)}, nil
	case kindNumber:
		if t != cty.Number {
			return nil, errors.New("want a number")
		}
		return []string{v.AsBigFloat().Text('g', -1)}, nil
	case kindBool:
		if t != cty.Bool {
			return nil, errors.New("want true or false")
		}
		return []string{strconv.FormatBool(v.True())}, nil
	case kindStrings:
		if t == cty.String {
			return []string{v.AsString()}, nil
		}
		if !t.IsTupleType() && !t.IsListType() {
			return nil, errors.New("want a list of strings")
		}
		var out []string
		for it := v.ElementIterator(); it.Next(); {
			_, e := it.Element()
			if e.IsNull() || e.Type() != cty.String {
				return nil, errors.New("want a list of strings")
			}
			out = append(out, e.AsString())
		}
		return out, nil
	case kindMap:
		if !t.IsObjectType() && !t.IsMapType() {
			return nil, errors.New(`want an object of strings, e.g. { KEY = "value" }`)
		}
		var out []string
		for it := v.ElementIterator(); it.Next(); {
			k, e := it.Element()
			if e.IsNull() || e.Type() != cty.String {
				return nil, fmt.Errorf("%s: want a string", k.AsString())
			}
			out = append(out, k.AsString()+"="+e.AsString())
		}
		sort.Strings(out)
		return out, nil
	}
	return nil, errors.New("unsupported key")
}

// setFlag sets the flag of key to values unless the command line set it,
// and checks the value the way molt run does, so that the error can point
// at the file.
func setFlag(fs *flag.FlagSet, key string, values []string, onCommandLine map[string]bool) error {
	name := strings.ReplaceAll(key, "_", "-")
	if key == "pass_env" {
		name = "env" // bare names: --env NAME
		for _, v := range values {
			if strings.Contains(v, "=") {
				return fmt.Errorf("%q: want a variable name (values go in env)", v)
			}
		}
	}
	if onCommandLine[name] {
		return nil // the command line overrides the file
	}
	for _, v := range values {
		if err := fs.Set(name, v); err != nil {
			return fmt.Errorf("%q: %v", v, unwrapFlagError(err))
		}
		if err := checkValue(name, v); err != nil {
			return err
		}
	}
	return nil
}

// unwrapFlagError drops the flag package's "invalid value ... for flag"
// prefix: the position already says which key.
func unwrapFlagError(err error) error {
	if u := errors.Unwrap(err); u != nil {
		return u
	}
	return err
}

// checkValue checks one value of a flag as molt run does later, so that a
// bad value in a file is reported with its position.
func checkValue(name, v string) error {
	switch name {
	case "listen":
		_, err := master.ParseListen(v, 0)
		return err
	case "workers", "backlog":
		if n, _ := strconv.Atoi(v); n < 1 {
			return fmt.Errorf("%s must be at least 1, not %s", name, v)
		}
	case "ready-timeout", "drain-timeout", "probation", "stable-after", "watchdog", "max-worker-lifetime", "health-check-timeout":
		if d, err := time.ParseDuration(v); err != nil || d <= 0 {
			return fmt.Errorf("%q is not a positive duration such as \"30s\"", v)
		}
	case "ready":
		_, err := parseReady(v)
		return err
	case "max-error-rate":
		_, err := parseRate(v)
		return err
	case "worker-stop-signal":
		_, err := parseSignal(v)
		return err
	case "commit":
		if v != "auto" && v != "manual" {
			return fmt.Errorf("%q: want auto or manual", v)
		}
	case "log-level":
		switch v {
		case "trace", "debug", "info", "warn", "error":
		default:
			return fmt.Errorf("%q: want trace, debug, info, warn or error", v)
		}
	case "socket-mode", "umask":
		if _, err := parseOctalMode(v); err != nil {
			return err
		}
	case "env":
		k, _, _ := strings.Cut(v, "=") // KEY=VALUE, or KEY alone (pass_env)
		if !validEnvName(k) {
			return fmt.Errorf("%q is not a valid environment variable name", k)
		}
	}
	return nil
}
