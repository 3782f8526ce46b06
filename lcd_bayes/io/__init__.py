"""Input and output: AnnData screens to validated arrays, the shared expression scale, run folders."""
