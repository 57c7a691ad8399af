//! Process limits the daemon sets at start.

/// Raises the soft open-file limit (`RLIMIT_NOFILE`) to the hard one, so
/// the appliance is not capped near 1,000 agents by the usual soft limit of
/// 1,024 (every agent holds a connection). Returns the soft limit before
/// and after.
pub fn raise_open_file_limit() -> std::io::Result<(u64, u64)> {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    let before = l.current.unwrap_or(u64::MAX);
    if l.current != l.maximum {
        l.current = l.maximum;
        setrlimit(Resource::Nofile, l).map_err(std::io::Error::from)?;
    }
    let after = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    Ok((before, after))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_soft_open_file_limit_becomes_the_hard_one() {
        use rustix::process::{getrlimit, setrlimit, Resource};
        // Lower the soft limit first, as a shell's default would.
        let mut l = getrlimit(Resource::Nofile);
        let hard = l.maximum;
        if hard.is_some_and(|h| h > 1024) {
            l.current = Some(1024);
            setrlimit(Resource::Nofile, l).unwrap();
        }
        let (before, after) = super::raise_open_file_limit().unwrap();
        assert!(before <= after);
        assert_eq!(getrlimit(Resource::Nofile).current, hard);
        assert_eq!(Some(after), hard.or(Some(u64::MAX)));
    }
}
