//! The READMEs hold together: every relative link in README.md,
//! */README.md and */*/README.md reaches a file (and, with an anchor, one of
//! its headings), and every volplane flag they name is a flag the binaries
//! accept, read from the clap definitions in controllers/src.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

/// Flags of other programs that the READMEs write on their own, without the
/// program's name in front of them in the same code span. Anything else in
/// a code span that starts with `--` is taken for a flag of volplane.
const OTHER_PROGRAMS_FLAGS: &[(&str, &str)] = &[
    // csi-provisioner's capacity tracking, switched off in the migration runbook.
    ("--enable-capacity", "csi-provisioner"),
    // The first of csi-provisioner's tuning flags in the benchmark table.
    ("--kube-api-capacity-qps", "csi-provisioner"),
    // Who owns csi-provisioner's objects, in the hand-back to it (README.md).
    ("--capacity-ownerref-level", "csi-provisioner"),
    // kube-apiserver's API switches, in the e2e table (tests/README.md).
    ("--runtime-config", "kube-apiserver"),
    // external-health-monitor's sweep interval in the benchmark table.
    ("--list-volumes-interval", "external-health-monitor"),
    // The hostpath driver's state directory in the e2e table.
    ("--statedir", "hostpathplugin"),
    // kube-controller-manager's garbage collection of finished pods.
    ("--terminated-pod-gc-threshold", "kube-controller-manager"),
    // kube-controller-manager's per-controller credentials (deploy/README.md).
    ("--use-service-account-credentials", "kube-controller-manager"),
    // kubectl apply / kubectl create against the demo's API server.
    ("--validate", "kubectl"),
    // cargo's feature switch for the demo.
    ("--features", "cargo"),
];

/// The workspace root: controllers/ is one of its members.
fn workspace() -> PathBuf {
    normalize(&Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
}

/// `path` with `.` and `..` resolved by name, as links are resolved.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other),
        }
    }
    out
}

/// `path` relative to the workspace root, for messages.
fn relative(path: &Path) -> String {
    let root = workspace();
    let path = normalize(path);
    path.strip_prefix(&root).unwrap_or(path.as_path()).display().to_string()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// README.md, */README.md and */*/README.md of the workspace (not in
/// target/ or hidden folders), sorted.
fn readmes() -> Vec<PathBuf> {
    let root = workspace();
    let mut found = Vec::new();
    collect_readmes(&root, 0, &mut found);
    found.sort();
    for required in ["README.md", "deploy/README.md"] {
        assert!(
            found.contains(&root.join(required)),
            "{required} is not among the READMEs found: {found:?}"
        );
    }
    found
}

fn collect_readmes(dir: &Path, depth: usize, found: &mut Vec<PathBuf>) {
    let readme = dir.join("README.md");
    if readme.is_file() {
        found.push(readme);
    }
    if depth == 2 {
        return;
    }
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display()));
    for entry in entries {
        let entry = entry.unwrap_or_else(|e| panic!("read {}: {e}", dir.display()));
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || name == "target" {
            continue;
        }
        let path = entry.path();
        if path.is_dir() {
            collect_readmes(&path, depth + 1, found);
        }
    }
}

/// `text` with its fenced code blocks blanked out line for line, so that
/// only prose, tables and inline code remain.
fn prose(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut fence: Option<&str> = None;
    for line in text.lines() {
        let trimmed = line.trim_start();
        match fence {
            Some(marker) => {
                if trimmed.starts_with(marker) {
                    fence = None;
                }
            }
            None if trimmed.starts_with("```") => fence = Some("```"),
            None if trimmed.starts_with("~~~") => fence = Some("~~~"),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// An inline code span: where it stands in the text, backticks included,
/// and the code between them.
struct CodeSpan<'a> {
    start: usize,
    end: usize,
    code: &'a str,
}

/// The inline code spans of `text`, by CommonMark's rule: a run of N
/// backticks opens a span that the next run of exactly N backticks closes
/// (also on a later line); a run without such a closer is literal.
fn code_spans(text: &str) -> Vec<CodeSpan<'_>> {
    let bytes = text.as_bytes();
    let run_at = |i: usize| bytes[i..].iter().take_while(|b| **b == b'`').count();
    let mut spans = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'`' {
            i += 1;
            continue;
        }
        let open = run_at(i);
        let code_start = i + open;
        let mut j = code_start;
        let mut close = None;
        while j < bytes.len() {
            if bytes[j] == b'`' {
                let run = run_at(j);
                if run == open {
                    close = Some(j);
                    break;
                }
                j += run;
            } else {
                j += 1;
            }
        }
        match close {
            Some(code_end) => {
                spans.push(CodeSpan {
                    start: i,
                    end: code_end + open,
                    code: &text[code_start..code_end],
                });
                i = code_end + open;
            }
            None => i = code_start,
        }
    }
    spans
}

/// `text` without its inline code spans.
fn without_code(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for span in code_spans(text) {
        out.push_str(&text[last..span.start]);
        last = span.end;
    }
    out.push_str(&text[last..]);
    out
}

/// The targets of the inline links `[text](target)` (images included) in
/// the prose of a markdown text, without their titles.
fn link_targets(markdown: &str) -> Vec<String> {
    let text = without_code(&prose(markdown));
    let mut targets = Vec::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("](") {
        let after = &rest[at + 2..];
        let mut depth = 1usize;
        let mut end = after.len();
        for (i, c) in after.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        end = i;
                        break;
                    }
                }
                '\n' => {
                    end = i;
                    break;
                }
                _ => {}
            }
        }
        if let Some(target) = after[..end].split_whitespace().next() {
            let target = target.strip_prefix('<').unwrap_or(target);
            let target = target.strip_suffix('>').unwrap_or(target);
            targets.push(target.to_string());
        }
        rest = &after[end..];
    }
    targets
}

/// A heading's anchor as GitHub makes it: lowercase, without the characters
/// that are not alphanumeric, space, hyphen or underscore (so backticks
/// go), spaces made hyphens.
fn slug(heading: &str) -> String {
    heading
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors of the ATX headings of a markdown text (outside code
/// blocks); a repeated heading gets `-1`, `-2`, … as on GitHub.
fn anchors(markdown: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut anchors = BTreeSet::new();
    for line in prose(markdown).lines() {
        let unindented = line.trim_start_matches(' ');
        if line.len() - unindented.len() > 3 {
            continue;
        }
        let hashes = unindented.len() - unindented.trim_start_matches('#').len();
        if !(1..=6).contains(&hashes) {
            continue;
        }
        let rest = &unindented[hashes..];
        if !(rest.is_empty() || rest.starts_with([' ', '\t'])) {
            continue;
        }
        let mut title = rest.trim();
        // An optional closing sequence of #s.
        let unclosed = title.trim_end_matches('#');
        if unclosed.is_empty() || unclosed.ends_with([' ', '\t']) {
            title = unclosed.trim_end();
        }
        let base = slug(title);
        let count = seen.entry(base.clone()).or_insert(0);
        anchors.insert(if *count == 0 { base } else { format!("{base}-{count}") });
        *count += 1;
    }
    anchors
}

#[test]
fn every_relative_link_in_the_readmes_resolves() {
    let mut checked = 0;
    let mut broken = Vec::new();
    for readme in readmes() {
        let text = read(&readme);
        let dir = readme.parent().expect("a README is in a folder");
        for target in link_targets(&text) {
            if ["http://", "https://", "mailto:"]
                .iter()
                .any(|scheme| target.starts_with(scheme))
            {
                continue;
            }
            checked += 1;
            let (path, anchor) = match target.split_once('#') {
                Some((path, anchor)) => (path, Some(anchor)),
                None => (target.as_str(), None),
            };
            let file = if path.is_empty() {
                readme.clone()
            } else {
                normalize(&dir.join(path))
            };
            if !file.exists() {
                broken.push(format!(
                    "{}: ({target}): {} does not exist",
                    relative(&readme),
                    relative(&file)
                ));
                continue;
            }
            let Some(anchor) = anchor else { continue };
            // Only markdown files have headings to check; a code file's
            // anchor is a line number.
            if !file.is_file() || file.extension().is_none_or(|extension| extension != "md") {
                continue;
            }
            if !anchors(&read(&file)).contains(anchor) {
                broken.push(format!(
                    "{}: ({target}): {} has no heading #{anchor}",
                    relative(&readme),
                    relative(&file)
                ));
            }
        }
    }
    assert!(
        checked > 50,
        "only {checked} relative links found: is the link parser broken?"
    );
    assert!(broken.is_empty(), "broken links in the READMEs:\n{}", broken.join("\n"));
}

/// The top-level items of an attribute's arguments, `inner` starting right
/// after the opening `(` (or `[`), and the offset of the closing bracket.
/// Strings and char literals are skipped, nested brackets kept whole.
fn attribute_items(inner: &str) -> Option<(Vec<&str>, usize)> {
    let bytes = inner.as_bytes();
    let mut items = Vec::new();
    let mut depth = 0usize;
    let mut item_start = 0;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    if bytes[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
            }
            // A char literal, 'x' or '\x': on to its closing quote.
            b'\'' => i += if bytes.get(i + 1) == Some(&b'\\') { 3 } else { 2 },
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => {
                if depth == 0 {
                    items.push(inner[item_start..i].trim());
                    return Some((items, i));
                }
                depth -= 1;
            }
            b',' if depth == 0 => {
                items.push(inner[item_start..i].trim());
                item_start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// Each `#[name(…)]` attribute of `source`: its top-level items, and the
/// source after its closing `)`.
fn attributes<'a>(source: &'a str, name: &str) -> Vec<(Vec<&'a str>, &'a str)> {
    let opener = format!("#[{name}(");
    let mut found = Vec::new();
    let mut rest = source;
    while let Some(at) = rest.find(&opener) {
        let inner = &rest[at + opener.len()..];
        let Some((items, end)) = attribute_items(inner) else {
            break;
        };
        let after = &inner[end + 1..];
        found.push((items, after));
        rest = after;
    }
    found
}

/// The name of the field an attribute stands on, given the source right
/// after the attribute's `)`: past its `]`, further attributes, comments
/// and `pub`, up to the `:`.
fn field_name(after_attribute: &str) -> Option<&str> {
    let mut rest = after_attribute.strip_prefix(']')?;
    loop {
        rest = rest.trim_start();
        if let Some(attribute) = rest.strip_prefix("#[") {
            let (_, end) = attribute_items(attribute)?;
            rest = &attribute[end + 1..];
        } else if rest.starts_with("//") {
            rest = rest.split_once('\n').map_or("", |(_, next)| next);
        } else {
            break;
        }
    }
    if let Some(public) = rest.strip_prefix("pub") {
        if public.starts_with(char::is_whitespace) {
            rest = public.trim_start();
        } else if let Some(scoped) = public.strip_prefix('(') {
            rest = scoped.split_once(')')?.1.trim_start();
        }
    }
    let rest = rest.strip_prefix("r#").unwrap_or(rest);
    let end = rest
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(rest.len());
    let name = &rest[..end];
    (!name.is_empty() && rest[end..].trim_start().starts_with(':')).then_some(name)
}

/// The long flags clap derives from `source`: a field with `#[arg(long)]`
/// is `--field-name`, with `#[arg(long = "name")]` it is `--name`.
fn long_flags(source: &str) -> Vec<String> {
    let mut flags = Vec::new();
    for (items, after) in attributes(source, "arg") {
        let explicit = items.iter().find_map(|item| {
            let value = item.strip_prefix("long")?.trim_start().strip_prefix('=')?.trim();
            value.strip_prefix('"')?.strip_suffix('"').map(str::to_string)
        });
        let name = match explicit {
            Some(name) => Some(name),
            None if items.contains(&"long") => field_name(after).map(|field| field.replace('_', "-")),
            None => None,
        };
        flags.extend(name.map(|name| format!("--{name}")));
    }
    flags
}

/// Whether a `#[command(…)]` of `source` asks clap for `--version`.
fn declares_version(source: &str) -> bool {
    attributes(source, "command").iter().any(|(items, _)| {
        items.iter().any(|item| {
            item.strip_prefix("version")
                .is_some_and(|rest| rest.is_empty() || rest.trim_start().starts_with('='))
        })
    })
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|entry| entry.unwrap_or_else(|e| panic!("read {}: {e}", dir.display())).path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|extension| extension == "rs") {
            out.push(path);
        }
    }
}

/// Every long flag of `volplane`, its subcommands and `kubectl volplane`:
/// what clap derives from controllers/src (args.rs and the rest).
fn volplane_flags() -> BTreeSet<String> {
    let src = workspace().join("controllers/src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(
        files.contains(&src.join("args.rs")),
        "controllers/src/args.rs: {files:?}"
    );
    // clap gives every command --help.
    let mut flags = BTreeSet::from(["--help".to_string()]);
    for file in files {
        let source = read(&file);
        if declares_version(&source) {
            flags.insert("--version".to_string());
        }
        flags.extend(long_flags(&source));
    }
    flags
}

/// `--[a-z][a-z0-9-]+` at the start of `word`, if there.
fn flag_token(word: &str) -> Option<String> {
    let name = word.strip_prefix("--")?;
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return None;
    }
    let end = name
        .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'))
        .unwrap_or(name.len());
    let name = name[..end].trim_end_matches('-');
    (name.len() >= 2).then(|| format!("--{name}"))
}

/// The flags a markdown text names as volplane's: of each inline code span
/// that starts with a flag, that flag (`--capacity-poll-interval DURATION`,
/// `--ephemeral-release=never`); of each that starts with `volplane `, all
/// of its flags. Spans that start with another program's name
/// (`kubectl … --x`, `cargo … --x`) are that program's.
fn named_flags(markdown: &str) -> Vec<String> {
    let text = prose(markdown);
    let mut flags = Vec::new();
    for span in code_spans(&text) {
        let code = span.code.replace('\n', " ");
        let code = code.trim();
        if code.starts_with("--") {
            flags.extend(flag_token(code));
        } else if code.starts_with("volplane ") {
            for word in code.split_whitespace() {
                flags.extend(flag_token(word.trim_start_matches(['[', '('])));
            }
        }
    }
    flags
}

#[test]
fn every_flag_the_readmes_name_is_a_flag_of_volplane() {
    let known = volplane_flags();
    for flag in [
        "--kubeconfig",
        "--capacity-poll-interval",
        "--once",
        "--context",
        "--version",
    ] {
        assert!(known.contains(flag), "{flag} not read from controllers/src: {known:?}");
    }
    let others: BTreeSet<&str> = OTHER_PROGRAMS_FLAGS.iter().map(|(flag, _)| *flag).collect();
    let mut checked = 0;
    let mut unknown = BTreeSet::new();
    for readme in readmes() {
        for flag in named_flags(&read(&readme)) {
            checked += 1;
            if !known.contains(&flag) && !others.contains(flag.as_str()) {
                unknown.insert(format!("{}: {flag}", relative(&readme)));
            }
        }
    }
    assert!(
        checked > 50,
        "only {checked} flags found: is the code span parser broken?"
    );
    assert!(
        unknown.is_empty(),
        "flags the READMEs name that volplane does not know (another program's flag written \
         alone belongs in OTHER_PROGRAMS_FLAGS):\n{}",
        unknown.into_iter().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn every_flag_left_to_another_program_is_named_and_is_not_volplanes() {
    let known = volplane_flags();
    let named: BTreeSet<String> = readmes().iter().flat_map(|readme| named_flags(&read(readme))).collect();
    for (flag, program) in OTHER_PROGRAMS_FLAGS {
        assert!(
            !known.contains(*flag),
            "{flag} ({program}) is a flag of volplane too: drop it from OTHER_PROGRAMS_FLAGS"
        );
        assert!(
            named.contains(*flag),
            "no README names {flag} ({program}) any more: drop it from OTHER_PROGRAMS_FLAGS"
        );
    }
}
