//! `gristmill migrate` and `gristmill scaffold` end to end: real git repositories made in temp
//! folders, the real binary, the default model, a real coordinator and worker for `--url`.
//! What the tiny default model answers is not judged here (a check with a bigger model is in
//! docs/workflows.md); what is: every file reported once, attempts and statuses as the rules
//! say, the cache sending nothing that did not change, the working tree never touched, paths
//! that leave a tree refused, local and coordinator runs alike.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A repository with Python files at several depths, one file that no glob matches, one that
/// --exclude drops, and a commit.
fn repo(root: &Path) -> PathBuf {
    let r = root.join("repo");
    let files = [
        (
            "app/greet.py",
            "def greet(name):\n    print \"Hello, %s!\" % name\n",
        ),
        (
            "app/util/clamp.py",
            "def clamp(x, lo, hi):\n    return max(lo, min(hi, x))\n",
        ),
        ("tool.py", "import sys\nprint sys.argv\n"),
        ("app/generated_pb2.py", "# generated\nX = 1\n"),
        ("README.md", "# demo\n"),
    ];
    for (p, text) in files {
        let path = r.join(p);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, text).expect("write");
    }
    git(&r, &["init", "-q", "-b", "main"]);
    git(&r, &["config", "user.name", "Test"]);
    git(&r, &["config", "user.email", "test@example.invalid"]);
    git(&r, &["add", "-A"]);
    git(&r, &["commit", "-q", "-m", "initial"]);
    r
}

const MATCHING: [&str; 3] = ["app/greet.py", "app/util/clamp.py", "tool.py"];

fn instruction(root: &Path) -> PathBuf {
    let p = root.join("instruction.md");
    std::fs::write(
        &p,
        "Port {path} from Python 2 to Python 3: `print x` statements become `print(x)` calls.\n",
    )
    .expect("write");
    p
}

fn gristmill(args: &[&str], extra: &[&Path]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_gristmill"))
        .args(args)
        .args(extra)
        .output()
        .expect("gristmill runs");
    assert!(
        out.status.success(),
        "gristmill {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `gristmill migrate` on `repo`; its report.
fn migrate(repo: &Path, instruction: &Path, report: &Path, args: &[&str]) -> Value {
    let mut all = vec![
        "migrate",
        "-q",
        "--threads",
        "1",
        "--include",
        "*.py",
        "--exclude",
        "*_pb2.py",
        "--max-tokens",
        "96",
    ];
    all.extend(args);
    gristmill(
        &all,
        &[
            Path::new("--repo"),
            repo,
            Path::new("--instruction"),
            instruction,
            Path::new("--report"),
            report,
        ],
    );
    serde_json::from_str(&std::fs::read_to_string(report).expect("report")).expect("json")
}

fn paths(report: &Value) -> Vec<String> {
    let mut v: Vec<String> = report["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| i["path"].as_str().expect("path").to_string())
        .collect();
    v.sort();
    v
}

fn sent(report: &Value) -> u64 {
    report["summary"]["requests_sent"].as_u64().expect("count")
}

/// What is compared between two runs of the same job: per file its status, attempts, tokens and
/// each attempt's outcome; the resulting tree.
fn outcome(report: &Value) -> Value {
    let items: Vec<Value> = report["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| {
            serde_json::json!({
                "path": i["path"], "status": i["status"], "attempts": i["attempts"],
                "prompt_tokens": i["prompt_tokens"], "completion_tokens": i["completion_tokens"],
                "outcomes": i["history"].as_array().expect("history").iter()
                    .map(|a| a["outcome"].clone()).collect::<Vec<_>>(),
            })
        })
        .collect();
    serde_json::json!({"items": items, "tree": report["outputs"]["tree"]})
}

#[test]
fn migrate_reports_each_file_once_and_reruns_from_the_cache() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = repo(dir.path());
    let instr = instruction(dir.path());
    let report = dir.path().join("out/report.json");
    let head = git(&repo, &["rev-parse", "HEAD"]);

    let first = migrate(&repo, &instr, &report, &["--max-attempts", "1"]);
    assert_eq!(paths(&first), MATCHING, "every matching file exactly once");
    for item in first["items"].as_array().expect("items") {
        assert_eq!(item["attempts"], 1, "{item}");
        assert!(
            ["applied", "no_change", "failed"].contains(&item["status"].as_str().expect("status")),
            "{item}"
        );
    }
    assert_eq!(sent(&first), 3);
    assert!(report.with_extension("html").exists() && report.with_extension("patch").exists());
    // The working tree, the index and the current branch are as they were.
    assert_eq!(git(&repo, &["status", "--porcelain"]), "");
    assert_eq!(git(&repo, &["rev-parse", "HEAD"]), head);
    assert_eq!(git(&repo, &["branch", "--show-current"]), "main");
    let applied = first["summary"]["applied"].as_u64().expect("applied");
    let branch = first["outputs"]["branch"].as_str().map(String::from);
    if applied > 0 {
        let b = branch.as_deref().expect("a branch when files were applied");
        assert_eq!(
            git(&repo, &["rev-parse", &format!("{b}^{{tree}}")]),
            first["outputs"]["tree"].as_str().expect("tree")
        );
        assert_eq!(git(&repo, &["rev-parse", &format!("{b}^")]), head);
    }

    // Unchanged repository: no request, the same branch.
    let second = migrate(&repo, &instr, &report, &["--max-attempts", "1"]);
    assert_eq!(sent(&second), 0, "a re-run sends nothing");
    assert_eq!(second["summary"]["cache_hits"], 3);
    assert_eq!(outcome(&first), outcome(&second));
    assert_eq!(second["outputs"]["commit"], first["outputs"]["commit"]);

    // One file edited and committed: one request.
    std::fs::write(
        repo.join("tool.py"),
        "import sys\nprint sys.argv\nprint len(sys.argv)\n",
    )
    .expect("write");
    git(&repo, &["commit", "-q", "-am", "edit tool.py"]);
    let third = migrate(&repo, &instr, &report, &["--max-attempts", "1"]);
    assert_eq!(sent(&third), 1, "only the edited file is sent");
    assert_eq!(paths(&third), MATCHING);
    assert_eq!(git(&repo, &["status", "--porcelain"]), "");
}

#[test]
fn an_always_failing_verifier_uses_every_attempt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = repo(dir.path());
    let instr = instruction(dir.path());
    let report = dir.path().join("report.json");
    let r = migrate(
        &repo,
        &instr,
        &report,
        &[
            "--max-attempts",
            "3",
            "--verify",
            "echo checking {path}; exit 1",
        ],
    );
    assert_eq!(paths(&r), MATCHING);
    for item in r["items"].as_array().expect("items") {
        assert_eq!(item["status"], "failed", "{item}");
        assert_eq!(item["attempts"], 3, "{item}");
        let seeds: Vec<u64> = item["history"]
            .as_array()
            .expect("history")
            .iter()
            .map(|a| a["seed"].as_u64().expect("seed"))
            .collect();
        assert_eq!(seeds, [0, 1, 2], "a new seed per attempt");
        // An attempt whose answer parsed ran the verifier, which said which file it checked.
        let verified = item["history"]
            .as_array()
            .expect("history")
            .iter()
            .any(|a| a["verify_exit"] == 1);
        if verified {
            let out = item["verify_output"].as_str().expect("verifier output");
            assert!(
                out.contains(&format!(
                    "checking {}",
                    item["path"].as_str().expect("path")
                )),
                "{out}"
            );
        }
    }
    assert_eq!(r["summary"]["failed"], 3);
    assert!(
        r["outputs"].get("branch").is_none(),
        "nothing verified, no branch"
    );
    // The scratch worktree the verifier ran in is gone.
    assert_eq!(git(&repo, &["worktree", "list"]).lines().count(), 1);
}

#[test]
fn bad_input_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = repo(dir.path());
    let instr = instruction(dir.path());
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_gristmill"))
            .args(["migrate", "--instruction"])
            .arg(&instr)
            .args(args)
            .output()
            .expect("runs");
        assert!(!out.status.success(), "{args:?} should fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let r = repo.to_str().expect("utf-8");
    assert!(run(&["--repo", r, "--include", "*.rs"]).contains("no file tracked at HEAD"));
    assert!(run(&["--repo", r, "--include", "src/[ab.py"]).contains("`[`"));
    let not_git = dir.path().join("plain");
    std::fs::create_dir(&not_git).expect("mkdir");
    assert!(run(&[
        "--repo",
        not_git.to_str().expect("utf-8"),
        "--include",
        "*.py"
    ])
    .contains("not inside a git repository"));
    let bad = dir.path().join("bad.md");
    std::fs::write(&bad, "Rename {old} in {path}").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_gristmill"))
        .args(["migrate", "--repo", r, "--include", "*.py", "--instruction"])
        .arg(&bad)
        .output()
        .expect("runs");
    assert!(String::from_utf8_lossy(&out.stderr).contains("uses {old}"));
}

/// Runs scaffold with one spec; the report.
fn scaffold(dir: &Path, out: &Path, force: bool) -> Value {
    scaffold_with(dir, out, force, &[])
}

fn scaffold_with(dir: &Path, out: &Path, force: bool, extra: &[&str]) -> Value {
    let template = dir.join("template.md");
    std::fs::write(
        &template,
        "A {language} service named {name}: one main file.\n",
    )
    .expect("write");
    let specs = dir.join("specs.csv");
    std::fs::write(&specs, "name,language\nbilling,Go\n").expect("write");
    let mut args = vec![
        "scaffold",
        "-q",
        "--threads",
        "1",
        "--max-tokens",
        "24",
        "--max-attempts",
        "1",
    ];
    if force {
        args.push("--force");
    }
    args.extend(extra);
    gristmill(
        &args,
        &[
            Path::new("--template"),
            &template,
            Path::new("--specs"),
            &specs,
            Path::new("--out"),
            out,
        ],
    );
    serde_json::from_str(
        &std::fs::read_to_string(out.join(".gristmill/scaffold-report.json")).expect("report"),
    )
    .expect("json")
}

/// Replaces every cached answer under `cache` with `answer`: the next run reads it as the
/// model's (a model can answer anything; these are the answers a hostile one would give).
fn answer_with(cache: &Path, answer: &str) {
    let mut n = 0;
    for shard in std::fs::read_dir(cache).expect("cache") {
        for entry in std::fs::read_dir(shard.expect("shard").path()).expect("shard") {
            let p = entry.expect("entry").path();
            let mut v: Value =
                serde_json::from_str(&std::fs::read_to_string(&p).expect("read")).expect("json");
            v["text"] = Value::String(answer.into());
            v["finish_reason"] = "stop".into();
            std::fs::write(&p, v.to_string()).expect("write");
            n += 1;
        }
    }
    assert_eq!(n, 1, "one request was cached");
}

#[test]
fn scaffold_writes_only_inside_each_tree() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out");
    let cache = out.join(".gristmill/cache");
    // A real answer (cut at 24 tokens: not JSON yet) fills the cache.
    let first = scaffold(dir.path(), &out, false);
    assert_eq!(first["items"][0]["path"], "billing");
    assert_eq!(first["summary"]["requests_sent"], 1);

    let outside = dir.path().join("outside");
    std::fs::create_dir(&outside).expect("mkdir");
    let tree = out.join("billing");
    std::fs::create_dir_all(&tree).expect("mkdir");
    std::os::unix::fs::symlink(&outside, tree.join("link")).expect("symlink");
    for (path, says) in [
        ("../../etc/passwd", "climbs out of the tree"),
        ("/etc/passwd", "absolute"),
        ("link/pwned.go", "symbolic link"),
    ] {
        answer_with(
            &cache,
            &serde_json::json!({"files": [{"path": "main.go", "content": "package main\n"},
                                          {"path": path, "content": "x"}]})
            .to_string(),
        );
        let r = scaffold(dir.path(), &out, true);
        let item = &r["items"][0];
        assert_eq!(item["status"], "failed", "{path}: {item}");
        assert!(
            item["error"].as_str().expect("error").contains(says),
            "{path}: {item}"
        );
        assert_eq!(r["summary"]["requests_sent"], 0);
        assert!(
            !tree.join("main.go").exists(),
            "nothing of a refused tree is written"
        );
    }
    assert_eq!(
        std::fs::read_dir(&outside).expect("outside").count(),
        0,
        "nothing written outside"
    );
    assert!(!dir.path().join("etc").exists());

    // A good answer is written once it verifies (in a staging copy); an existing file is kept
    // without --force, replaced with it.
    answer_with(
        &cache,
        r#"{"files": [{"path": "cmd/main.go", "content": "package main\n"}, {"path": "README.md", "content": "billing\n"}]}"#,
    );
    let r = scaffold_with(
        dir.path(),
        &out,
        false,
        &["--verify", "echo broken; exit 3"],
    );
    let item = &r["items"][0];
    assert_eq!(item["status"], "failed", "{r}");
    assert_eq!(item["history"][0]["verify_exit"], 3, "{r}");
    assert!(item["verify_output"]
        .as_str()
        .expect("output")
        .contains("broken"));
    assert!(
        !tree.join("cmd/main.go").exists(),
        "a tree that fails its check is not written"
    );
    let check =
        "test -f cmd/main.go && test {name} = billing && test \"$GRISTMILL_NAME\" = billing";
    let r = scaffold_with(dir.path(), &out, false, &["--verify", check]);
    assert_eq!(r["items"][0]["status"], "applied", "{r}");
    assert!(!out.join(".gristmill/staging/billing").exists());
    assert_eq!(
        std::fs::read_to_string(tree.join("cmd/main.go")).expect("written"),
        "package main\n"
    );
    std::fs::write(tree.join("README.md"), "mine\n").expect("write");
    let r = scaffold(dir.path(), &out, false);
    let files = r["items"][0]["files"].as_array().expect("files");
    assert!(
        files
            .iter()
            .any(|f| f["path"] == "README.md" && f["written"] == "kept"),
        "{r}"
    );
    assert_eq!(
        std::fs::read_to_string(tree.join("README.md")).expect("kept"),
        "mine\n"
    );
    scaffold(dir.path(), &out, true);
    assert_eq!(
        std::fs::read_to_string(tree.join("README.md")).expect("forced"),
        "billing\n"
    );
}

#[test]
fn migrate_through_a_coordinator_gives_the_local_report() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = repo(dir.path());
    let instr = instruction(dir.path());
    let verify = [
        "--max-attempts",
        "2",
        "--verify",
        "python3 -m py_compile {path}",
    ];

    let local_cache = dir.path().join("local-cache");
    let mut args = verify.to_vec();
    args.extend([
        "--cache",
        local_cache.to_str().expect("utf-8"),
        "--apply",
        "none",
    ]);
    let local = migrate(&repo, &instr, &dir.path().join("local.json"), &args);

    let mut c = common::Cluster::start(&[
        "--autoscale-dry-run",
        "--tokenizer",
        common::default_model().to_str().expect("utf-8 path"),
    ]);
    c.start_worker(&[], &[]);
    let remote_cache = dir.path().join("remote-cache");
    let mut args = verify.to_vec();
    args.extend([
        "--cache",
        remote_cache.to_str().expect("utf-8"),
        "--apply",
        "none",
        "--url",
        &c.url,
    ]);
    let remote = migrate(&repo, &instr, &dir.path().join("remote.json"), &args);
    assert_eq!(outcome(&local), outcome(&remote));
    assert_eq!(sent(&local), sent(&remote));
    assert!(sent(&remote) >= 3);
    assert!(remote["model"]
        .as_str()
        .expect("model")
        .starts_with("coordinator http://"));
}
