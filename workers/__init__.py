"""scribeline.workers: the Ray side: tasks that render and write shards."""
