"""Operations: stats rollups, the event feed, the dashboard, the CLI client."""
