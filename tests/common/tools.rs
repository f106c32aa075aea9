//! The outside programs some tests compare against (installed by
//! `scripts/install_test_tools.sh`, which sets the variables named here).

use std::path::PathBuf;

/// A tool from the variable `var`, else the first of `names` on the PATH. None (the caller
/// skips, saying so) when there is none, unless `BSFA_REQUIRE_TOOLS` is set, as in CI: then
/// the test fails.
pub fn tool(var: &str, names: &[&str]) -> Option<PathBuf> {
    let found = std::env::var_os(var).map(PathBuf::from).or_else(|| {
        let path = std::env::var_os("PATH")?;
        names.iter().find_map(|name| {
            std::env::split_paths(&path)
                .map(|dir| dir.join(name))
                .find(|p| p.is_file())
        })
    });
    if found.is_none() {
        assert!(
            std::env::var_os("BSFA_REQUIRE_TOOLS").is_none(),
            "{var} is not set and none of {names:?} is on the PATH, and BSFA_REQUIRE_TOOLS is \
             set: run scripts/install_test_tools.sh"
        );
        eprintln!("skipped: {var} is not set (scripts/install_test_tools.sh sets it)");
    }
    found
}
