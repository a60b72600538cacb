//! The module map, checked: which top-level module may use which. Dependencies run one way
//! (a transport over the controller, the controller over the data road, the data road over
//! leaves); this test reads every source file and fails on an edge the map does not allow, so
//! a cycle cannot creep back in unseen. The same map is drawn in the README ("Layout").

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Each module and the modules it may use (`crate::NAME`). Ordered from the top down; a
/// module may only name modules listed after it.
#[rustfmt::skip]
const ALLOWED: &[(&str, &[&str])] = &[
    // The central repository server: beside the agent, sharing its TLS listener and leaves.
    ("imagerepo", &["api", "repo", "format", "progress", "proto", "error", "util"]),
    // Transports: thin, over the controller.
    ("api", &["ops", "config", "hypervisor", "repo", "format", "proto", "error", "util"]),
    ("cli", &["ops", "config", "proto", "error", "util"]),
    // The one internal API.
    ("ops", &["capture", "export", "upload", "hypervisor", "guest", "repo", "config",
              "format", "progress", "hostfile", "error", "util"]),
    ("config", &["upload", "hostfile", "error", "util"]),
    // The data road.
    ("capture", &["hypervisor", "guest", "repo", "nbd", "format", "progress", "error", "util"]),
    ("export", &["repo", "format", "progress", "hostfile", "error", "util"]),
    // Remote targets. `repo` and `proto`: the imagerepo target is a chunk store of the
    // pipeline (the `repo::ChunkStore` seam) and speaks imagerepo.v1 through its client.
    ("upload", &["repo", "format", "progress", "hostfile", "proto", "error", "util"]),
    // The hypervisor seam over the guest agent.
    ("hypervisor", &["guest", "error", "util"]),
    ("guest", &["error", "util"]),
    // Storage and leaves.
    ("repo", &["error", "util"]),
    ("hostfile", &["error", "util"]),
    ("format", &["error"]),
    ("progress", &["error"]),
    ("nbd", &[]),
    ("util", &["error"]),
    ("error", &[]),
    ("proto", &[]),
];

/// Every `crate::NAME` a file names (in paths and in `use crate::{a, b}` groups).
fn named_modules(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    for (i, _) in text.match_indices("crate::") {
        // `imaged::crate::` cannot happen; skip `$crate::` of macros.
        if text[..i].ends_with('$') {
            continue;
        }
        let rest = &text[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for part in group[..end].split(',') {
                let name = ident(part.trim());
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        } else {
            let name = ident(rest);
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

fn walk(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            walk(&p, files);
        } else if p.extension().is_some_and(|x| x == "rs") {
            files.push(p);
        }
    }
}

#[test]
fn module_dependencies_run_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    // The map itself is a top-down order: nothing may name a module listed before it.
    let rank: BTreeMap<&str, usize> = ALLOWED
        .iter()
        .enumerate()
        .map(|(i, (m, _))| (*m, i))
        .collect();
    for (m, deps) in ALLOWED {
        for d in *deps {
            assert!(
                rank[d] > rank[m],
                "the map lets {m} use {d}, which is listed above it: that is a cycle"
            );
        }
    }
    let mut files = Vec::new();
    walk(&src, &mut files);
    let mut bad = Vec::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = top.trim_end_matches(".rs").to_string();
        if matches!(module.as_str(), "bin" | "lib" | "layering") {
            continue; // the binaries and the crate root may name anything
        }
        let Some(deps) = allowed.get(module.as_str()) else {
            panic!(
                "{} is in no row of the module map in src/layering.rs",
                rel.display()
            );
        };
        // Comments (doc links included) may mention any module: only code is a dependency.
        let code: String = std::fs::read_to_string(&f)
            .unwrap()
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        for named in named_modules(&code) {
            if named != module && !deps.contains(&named.as_str()) {
                bad.push(format!("{} uses crate::{named}", rel.display()));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "module edges the map in src/layering.rs does not allow:\n  {}",
        bad.join("\n  ")
    );
}

#[test]
fn use_groups_are_read() {
    let m = named_modules("use crate::{error::Result, util};\nlet x = crate::repo::X;");
    assert_eq!(m.into_iter().collect::<Vec<_>>(), ["error", "repo", "util"]);
}
