"""`--workers N`: several router processes serving one port.

supervisor     the parent: binds the port once, starts N workers that inherit the
               listening socket, restarts one that dies, forwards SIGTERM and exits when
               they have drained.
slot           what a worker knows about itself (index, count, the shared socket, where its
               siblings listen) and how router-wide limits split between workers.
siblings       the channel between workers: each also serves the router's app on a private
               Unix socket; placements (routing hints) and admin writes go to every
               sibling over it, and /metrics gathers every worker's counters.
metrics_merge  one exposition from every worker's (pure).
"""
