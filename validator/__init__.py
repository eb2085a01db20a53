"""Graph validator (issue 3): allowlist, limits and static checks on a submitted graph before it runs."""
