//! Slurm's compressed host lists (`node[01-04,07],gpu-a[1-2]-b`) and task counts
//! (`2(x3),1`), as `SLURM_STEP_NODELIST` and `SLURM_STEP_TASKS_PER_NODE` write them.

use anyhow::{bail, Context, Result};

/// The first host of a Slurm host list: rank 0 runs there (Slurm gives task 0 to the first
/// node of a step). Each bracket keeps its zero padding: `node[007-009]` starts at `node007`.
pub fn first_host(list: &str) -> Result<String> {
    let first = split_top_level(list.trim())
        .into_iter()
        .next()
        .filter(|h| !h.is_empty())
        .with_context(|| format!("the Slurm node list '{list}' names no host"))?;
    let mut host = String::new();
    let mut rest = first;
    while let Some(open) = rest.find('[') {
        let close = rest[open..]
            .find(']')
            .map(|c| open + c)
            .with_context(|| format!("unbalanced '[' in the Slurm node list '{list}'"))?;
        host.push_str(&rest[..open]);
        let first_range = rest[open + 1..close].split(',').next().unwrap_or("");
        let start = first_range.split('-').next().unwrap_or("").trim();
        if start.is_empty() || !start.bytes().all(|b| b.is_ascii_digit()) {
            bail!(
                "cannot read the range '[{}]' in the Slurm node list '{list}'",
                &rest[open + 1..close]
            );
        }
        host.push_str(start);
        rest = &rest[close + 1..];
    }
    host.push_str(rest);
    Ok(host)
}

/// Splits a host list at the commas outside brackets.
fn split_top_level(list: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0usize, 0);
    for (i, c) in list.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&list[start..]);
    parts
}

/// The number of tasks on node `node` (0-based, in node-list order) of a Slurm tasks-per-node
/// list such as `2(x3),1`: three nodes with two tasks, then one with one.
pub fn tasks_on_node(list: &str, node: usize) -> Result<usize> {
    let bad = || format!("cannot read the Slurm tasks-per-node list '{list}'");
    let mut seen = 0usize;
    for item in list.trim().split(',') {
        let (tasks, repeat) = match item.split_once("(x") {
            Some((tasks, repeat)) => (tasks, repeat.strip_suffix(')').with_context(bad)?),
            None => (item, "1"),
        };
        let tasks: usize = tasks.trim().parse().with_context(bad)?;
        seen += repeat.trim().parse::<usize>().with_context(bad)?;
        if node < seen {
            return Ok(tasks);
        }
    }
    bail!("{}: it lists {seen} nodes, and this is node {node}", bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_hosts() -> Result<()> {
        for (list, host) in [
            ("node[01-04,07]", "node01"),
            ("node[07,01-04]", "node07"),
            ("gpu17", "gpu17"),
            ("gpu17,gpu3", "gpu17"),
            ("a[2-3]-b[009-010],c1", "a2-b009"),
            ("rack[1-2]-n[5-6].cluster", "rack1-n5.cluster"),
            (" n[3] ", "n3"),
        ] {
            assert_eq!(first_host(list)?, host, "{list}");
        }
        for bad in ["", "node[01-04", "node[]", "node[a-b]"] {
            assert!(first_host(bad).is_err(), "{bad}");
        }
        Ok(())
    }

    #[test]
    fn tasks_per_node() -> Result<()> {
        let list = "2(x3),1,4(x2)";
        let counts: Vec<usize> = (0..6)
            .map(|n| tasks_on_node(list, n))
            .collect::<Result<_>>()?;
        assert_eq!(counts, [2, 2, 2, 1, 4, 4]);
        assert_eq!(tasks_on_node("8", 0)?, 8);
        assert!(tasks_on_node(list, 6).is_err());
        assert!(tasks_on_node("2(x", 0).is_err());
        Ok(())
    }
}
