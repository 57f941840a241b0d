package integration

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"unicode"
)

// The docs are the markdown files at the top level and under docs/.
// Their links are checked as GitHub renders them: a relative link must
// name a file that exists, and a #fragment a heading of that file.

// mdLink matches an inline link or image, [text](target "title"), and
// captures the target.
var mdLink = regexp.MustCompile(`\]\(([^)\s]+)(?:\s+"[^"]*")?\)`)

// mdInlineLink is a link inside a heading: it renders as its text.
var mdInlineLink = regexp.MustCompile(`\[([^\]]*)\]\([^)]*\)`)

// mdDoc is one parsed markdown file.
type mdDoc struct {
	anchors map[string]bool
	links   []mdRef
}

// mdRef is a link and the line it is on.
type mdRef struct {
	line   int
	target string
}

// headingSlug is GitHub's anchor for a heading: its text lowercased,
// every character that is not a letter, a mark, a digit, '_', '-' or a
// space dropped, and spaces turned into '-'.
func headingSlug(heading string) string {
	text := mdInlineLink.ReplaceAllString(heading, "$1")
	var b strings.Builder
	for _, r := range strings.ToLower(text) {
		switch {
		case r == ' ':
			b.WriteRune('-')
		case r == '-' || r == '_' || unicode.IsLetter(r) || unicode.IsMark(r) || unicode.IsDigit(r):
			b.WriteRune(r)
		}
	}
	return b.String()
}

// parseMarkdown returns the anchors of the headings in src and the links
// outside code, in order. A repeated heading gets GitHub's -1, -2, ...
func parseMarkdown(src string) mdDoc {
	doc := mdDoc{anchors: map[string]bool{}}
	seen := map[string]int{}
	// Links are looked for a paragraph at a time: a code span may run over
	// lines, not over paragraphs.
	var para []string
	paraLine := 0
	flush := func() {
		text := withoutCodeSpans(strings.Join(para, "\n"))
		for _, m := range mdLink.FindAllStringSubmatchIndex(text, -1) {
			line := paraLine + strings.Count(text[:m[0]], "\n")
			doc.links = append(doc.links, mdRef{line: line, target: text[m[2]:m[3]]})
		}
		para = nil
	}
	fence := ""
	for i, line := range strings.Split(src, "\n") {
		trimmed := strings.TrimLeft(line, " ")
		if fence != "" {
			if strings.HasPrefix(trimmed, fence) {
				fence = ""
			}
			continue
		}
		if strings.HasPrefix(trimmed, "```") || strings.HasPrefix(trimmed, "~~~") {
			flush()
			fence = trimmed[:3]
			continue
		}
		if strings.TrimSpace(line) == "" {
			flush()
			continue
		}
		if level := len(line) - len(strings.TrimLeft(line, "#")); level >= 1 && level <= 6 && strings.HasPrefix(line[level:], " ") {
			flush()
			text := strings.TrimSpace(strings.TrimRight(strings.TrimSpace(line[level:]), "#"))
			slug := headingSlug(text)
			if n := seen[slug]; n > 0 {
				doc.anchors[fmt.Sprintf("%s-%d", slug, n)] = true
			} else {
				doc.anchors[slug] = true
			}
			seen[slug]++
			para, paraLine = []string{line}, i+1
			flush()
			continue
		}
		if len(para) == 0 {
			paraLine = i + 1
		}
		para = append(para, line)
	}
	flush()
	return doc
}

// withoutCodeSpans blanks out the `code` spans of a paragraph, where
// brackets are not links, keeping its newlines. Backticks pair up in
// order; a last one without a partner is literal.
func withoutCodeSpans(text string) string {
	ticks := []int{}
	for i := 0; i < len(text); i++ {
		if text[i] == '`' {
			ticks = append(ticks, i)
		}
	}
	b := []byte(text)
	for k := 0; k+1 < len(ticks); k += 2 {
		for i := ticks[k] + 1; i < ticks[k+1]; i++ {
			if b[i] != '\n' {
				b[i] = ' '
			}
		}
	}
	return string(b)
}

// TestDocs_LinksResolve: every relative link in the docs names a file
// that exists and, with a #fragment, a heading of that file; every page
// under docs/ is linked from the README.
func TestDocs_LinksResolve(t *testing.T) {
	t.Parallel()
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	top, _ := filepath.Glob(filepath.Join(root, "*.md"))
	pages, _ := filepath.Glob(filepath.Join(root, "docs", "*.md"))
	files := append(top, pages...)
	if len(top) == 0 || len(pages) == 0 {
		t.Fatalf("no docs found under %s: %v", root, files)
	}

	parsed := map[string]mdDoc{}
	parse := func(path string) (mdDoc, error) {
		if d, ok := parsed[path]; ok {
			return d, nil
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return mdDoc{}, err
		}
		d := parseMarkdown(string(b))
		parsed[path] = d
		return d, nil
	}

	fromREADME := map[string]bool{}
	for _, file := range files {
		doc, err := parse(file)
		if err != nil {
			t.Fatal(err)
		}
		rel, _ := filepath.Rel(root, file)
		for _, l := range doc.links {
			where := fmt.Sprintf("%s:%d: link %q", rel, l.line, l.target)
			if strings.Contains(l.target, "://") || strings.HasPrefix(l.target, "mailto:") {
				continue
			}
			pathPart, frag, _ := strings.Cut(l.target, "#")
			target := file
			if pathPart != "" {
				if strings.HasPrefix(pathPart, "/") {
					t.Errorf("%s: use a relative link", where)
					continue
				}
				target = filepath.Join(filepath.Dir(file), filepath.FromSlash(pathPart))
				if r, err := filepath.Rel(root, target); err != nil || strings.HasPrefix(r, "..") {
					t.Errorf("%s: points outside the repository", where)
					continue
				}
				if _, err := os.Stat(target); err != nil {
					t.Errorf("%s: no such file", where)
					continue
				}
			}
			if file == filepath.Join(root, "README.md") {
				fromREADME[target] = true
			}
			if frag == "" {
				continue
			}
			if !strings.HasSuffix(target, ".md") {
				t.Errorf("%s: a #fragment on a file that is not markdown", where)
				continue
			}
			tdoc, err := parse(target)
			if err != nil {
				t.Errorf("%s: %v", where, err)
				continue
			}
			if !tdoc.anchors[frag] {
				t.Errorf("%s: no heading with the anchor #%s", where, frag)
			}
		}
	}
	for _, page := range pages {
		if !fromREADME[page] {
			rel, _ := filepath.Rel(root, page)
			t.Errorf("README.md does not link %s", rel)
		}
	}
}

// TestDocs_HeadingSlug pins the anchors GitHub makes of headings.
func TestDocs_HeadingSlug(t *testing.T) {
	t.Parallel()
	for heading, want := range map[string]string{
		"Running molt": "running-molt",
		"molt drill: prove it on your own deployment": "molt-drill-prove-it-on-your-own-deployment",
		"After the commit: taking the service back":   "after-the-commit-taking-the-service-back",
		"`TERM`, `INT`":                                "term-int",
		"How [ServeHTTP](x.md) drains":                 "how-servehttp-drains",
		"Exit codes of molt ctl":                       "exit-codes-of-molt-ctl",
		"The keeper is SIGKILLed":                      "the-keeper-is-sigkilled",
		"`MOLT_RECYCLE=1` and `--max-worker-lifetime`": "molt_recycle1-and---max-worker-lifetime",
	} {
		if got := headingSlug(heading); got != want {
			t.Errorf("headingSlug(%q) = %q, want %q", heading, got, want)
		}
	}
	doc := parseMarkdown("# A\n\n## A\n\n```sh\n# not a heading\n[x](nowhere.md)\n```\n`[w](v.md)` [u](t.md#a-1) `a\nspan [s](s.md)` [z](\n\n`open [y](y.md)\n")
	for _, a := range []string{"a", "a-1"} {
		if !doc.anchors[a] {
			t.Errorf("anchor %q missing: %v", a, doc.anchors)
		}
	}
	if doc.anchors["not-a-heading"] {
		t.Error("a comment in a code block counted as a heading")
	}
	if len(doc.links) != 2 || doc.links[0].target != "t.md#a-1" || doc.links[1].target != "y.md" {
		t.Errorf("links %v, want t.md#a-1 and y.md", doc.links)
	}
}

// eventKey matches the stable key of a log line in molt's code:
// "event", "area.what".
var eventKey = regexp.MustCompile(`"event", "([a-z_]+\.[a-z_.]+)"`)

// TestDocs_EventKeysAreDocumented: the event keys are the interface
// operators alert on (docs/operating.md, "Events: what to alert on").
// Every key a log line of molt carries is in that table, and every key
// of the table is still logged. The upgrade's keys are documented in
// docs/upgrades.md, which the table points to.
func TestDocs_EventKeysAreDocumented(t *testing.T) {
	t.Parallel()
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	inCode := map[string]string{} // key → a file that logs it
	for _, dir := range []string{"master", "cmd", "upgrade", "worker"} {
		err := filepath.WalkDir(filepath.Join(root, dir), func(path string, d os.DirEntry, err error) error {
			if err != nil || d.IsDir() || !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
				return err
			}
			b, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			for _, m := range eventKey.FindAllStringSubmatch(string(b), -1) {
				inCode[m[1]] = path
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	if len(inCode) < 20 {
		t.Fatalf("only %d event keys found in the code: %v", len(inCode), inCode)
	}
	b, err := os.ReadFile(filepath.Join(root, "docs", "operating.md"))
	if err != nil {
		t.Fatal(err)
	}
	_, section, ok := strings.Cut(string(b), "### Events: what to alert on")
	if !ok {
		t.Fatal(`docs/operating.md has no "Events: what to alert on" section`)
	}
	section, _, _ = strings.Cut(section, "\n## ")
	inTable := map[string]bool{}
	for _, line := range strings.Split(section, "\n") {
		if !strings.HasPrefix(line, "| `") || strings.HasPrefix(line, "| `event` |") { // not a row, or the heading
			continue
		}
		cell := strings.Split(line, "|")[1]
		for _, k := range regexp.MustCompile("`([^`]+)`").FindAllStringSubmatch(cell, -1) {
			inTable[k[1]] = true
		}
	}
	for k, path := range inCode {
		if strings.HasPrefix(k, "upgrade.") {
			continue // docs/upgrades.md
		}
		if !inTable[k] {
			t.Errorf("event %s (logged in %s) is not in docs/operating.md's table of events", k, path)
		}
	}
	for k := range inTable {
		if _, ok := inCode[k]; !ok && k != "upgrade.*" {
			t.Errorf("docs/operating.md's table of events lists %s, which no log line carries", k)
		}
	}
	// docs/upgrades.md lists the upgrade's keys worth an alert: each must
	// still be logged.
	b, err = os.ReadFile(filepath.Join(root, "docs", "upgrades.md"))
	if err != nil {
		t.Fatal(err)
	}
	listed := 0
	for _, line := range strings.Split(string(b), "\n") {
		m := regexp.MustCompile("^\\| `(upgrade\\.[a-z_]+)` \\|").FindStringSubmatch(line)
		if m == nil {
			continue
		}
		listed++
		if _, ok := inCode[m[1]]; !ok {
			t.Errorf("docs/upgrades.md lists the event %s, which no log line carries", m[1])
		}
	}
	if listed < 5 {
		t.Errorf("docs/upgrades.md lists %d upgrade events; its table of events to alert on is gone", listed)
	}
}
