"""Where tenants' budgets are kept: in this process (one worker), with the worker that
owns the tenant (--workers), or in Redis (--redis-url: every router sharing it). The
decisions are fairness/budgets.py's."""
