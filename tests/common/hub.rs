//! A stand-in for the Hugging Face hub on 127.0.0.1: repositories at revisions, listed and
//! downloaded (ranged, with the headers hf-hub checks) as the hub does it, every request
//! logged; a test can make a file's requests fail or hang.

use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One revision of a repository: the names it is asked for by (a branch, and always its
/// commit) and its files (repository path -> bytes).
pub struct Revision {
    pub names: Vec<String>,
    pub commit: String,
    pub files: HashMap<String, Vec<u8>>,
}

impl Revision {
    /// `files` at the branch `name`, at commit `commit`.
    pub fn new(name: &str, commit: &str, files: HashMap<String, Vec<u8>>) -> Self {
        Self {
            names: vec![name.to_string(), commit.to_string()],
            commit: commit.to_string(),
            files,
        }
    }
}

/// A repository as its URLs name it: `datasets/Owner/name`, or a model's `name`.
pub struct Repository {
    pub id: String,
    pub revisions: Vec<Revision>,
}

/// The running stand-in.
#[derive(Clone)]
pub struct Hub {
    /// `http://127.0.0.1:PORT`, for `HF_ENDPOINT`.
    pub url: String,
    /// Every file request, as `<repository path> <Range header>`, in arrival order.
    pub log: Arc<Mutex<Vec<String>>>,
    /// Repository paths whose requests are held unanswered while they are listed here.
    pub stalled: Arc<Mutex<HashSet<String>>>,
    /// Repository path -> how many more of its requests fail with a 500.
    pub failing: Arc<Mutex<HashMap<String, usize>>>,
}

impl Hub {
    /// How many requests for `path` (a repository path) arrived.
    pub fn requests_for(&self, path: &str) -> usize {
        let log = self.log.lock().unwrap();
        log.iter()
            .filter(|l| l.split(' ').next() == Some(path))
            .count()
    }
}

/// The commit every stand-in revision of a single-revision repository has.
pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Serves `repos` for `lifetime`, answering each request after `delay`.
pub fn serve(repos: Vec<Repository>, lifetime: Duration, delay: Duration) -> Hub {
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let port = server.server_addr().to_ip().unwrap().port();
    let hub = Hub {
        url: format!("http://127.0.0.1:{port}"),
        log: Arc::default(),
        stalled: Arc::default(),
        failing: Arc::default(),
    };
    let repos = Arc::new(repos);
    let state = hub.clone();
    std::thread::spawn(move || {
        let deadline = Instant::now() + lifetime;
        while Instant::now() < deadline {
            let Ok(Some(request)) = server.recv_timeout(Duration::from_millis(100)) else {
                continue;
            };
            // Each request on its own thread: a stalled one holds up no other.
            let (repos, state) = (repos.clone(), state.clone());
            std::thread::spawn(move || {
                std::thread::sleep(delay);
                answer(request, &repos, &state, deadline);
            });
        }
    });
    hub
}

/// The revision of `repo` named `name` (`%2F` for `/`, as hf-hub writes it).
fn revision<'a>(repo: &'a Repository, name: &str) -> Option<&'a Revision> {
    let name = name.replace("%2F", "/");
    repo.revisions.iter().find(|r| r.names.contains(&name))
}

fn answer(request: tiny_http::Request, repos: &[Repository], hub: &Hub, deadline: Instant) {
    let url = request.url().to_string();
    for repo in repos {
        if let Some(rev) = url.strip_prefix(&format!("/api/{}/revision/", repo.id)) {
            let Some(rev) = revision(repo, rev.split('?').next().unwrap_or(rev)) else {
                break;
            };
            let siblings: Vec<Value> = rev
                .files
                .keys()
                .map(|k| serde_json::json!({ "rfilename": k }))
                .collect();
            let body = serde_json::json!({"sha": rev.commit, "siblings": siblings}).to_string();
            let _ = request.respond(tiny_http::Response::from_string(body));
            return;
        }
        let Some(rest) = url.strip_prefix(&format!("/{}/resolve/", repo.id)) else {
            continue;
        };
        let Some((rev, path)) = rest.split_once('/') else {
            break;
        };
        let Some(rev) = revision(repo, rev) else {
            break;
        };
        let Some(data) = rev.files.get(path) else {
            break;
        };
        return send_file(request, path, data, &rev.commit, hub, deadline);
    }
    let _ = request.respond(tiny_http::Response::empty(404));
}

/// Answers a (ranged) download of `data`, the file at `path`: held while `path` is
/// stalled, a 500 while it is failing.
fn send_file(
    request: tiny_http::Request,
    path: &str,
    data: &[u8],
    commit: &str,
    hub: &Hub,
    deadline: Instant,
) {
    let range = request
        .headers()
        .iter()
        .find(|h| h.field.equiv("Range"))
        .map(|h| h.value.to_string())
        .unwrap_or_default();
    hub.log.lock().unwrap().push(format!("{path} {range}"));
    while hub.stalled.lock().unwrap().contains(path) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Some(left) = hub
        .failing
        .lock()
        .unwrap()
        .get_mut(path)
        .filter(|n| **n > 0)
    {
        *left -= 1;
        let _ = request.respond(tiny_http::Response::empty(500));
        return;
    }
    let header = |k: &str, v: &str| tiny_http::Header::from_bytes(k, v).unwrap();
    let spec = range.trim_start_matches("bytes=");
    let last = data.len() - 1;
    let (start, end) = match spec.split_once('-') {
        Some((a, b)) => (a.parse().unwrap_or(0), b.parse().unwrap_or(last).min(last)),
        None => (0, last),
    };
    let etag = format!(
        "{:016x}{:08x}",
        data.len(),
        data.iter().map(|&b| b as u32).sum::<u32>()
    );
    let response = tiny_http::Response::from_data(data[start..=end].to_vec())
        .with_status_code(206)
        .with_header(header("ETag", &format!("\"{etag}\"")))
        .with_header(header("X-Repo-Commit", commit))
        .with_header(header(
            "Content-Range",
            &format!("bytes {start}-{end}/{}", data.len()),
        ));
    let _ = request.respond(response);
}

/// The stand-in hub serving `dataset` (a repository id such as `datasets/Salesforce/wikitext`)
/// at `revisions`, and the model `gpt2` with `tokenizer` as its `tokenizer.json`.
pub fn hub_with(
    dataset: &str,
    revisions: Vec<Revision>,
    tokenizer: &std::path::Path,
    delay: Duration,
) -> Hub {
    let gpt2 = HashMap::from([(
        "tokenizer.json".to_string(),
        std::fs::read(tokenizer).unwrap(),
    )]);
    serve(
        vec![
            Repository {
                id: dataset.into(),
                revisions,
            },
            Repository {
                id: "gpt2".into(),
                revisions: vec![Revision::new("main", COMMIT, gpt2)],
            },
        ],
        Duration::from_secs(240),
        delay,
    )
}
