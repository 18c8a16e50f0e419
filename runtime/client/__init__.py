"""The client site: a small daemon (register, heartbeat, fetch tasks, upload results) and a training
worker process that runs the job's learner. The daemon never imports torch."""
