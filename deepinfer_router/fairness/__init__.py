"""Fair sharing under overload (issue 19): pure decision code, time as an argument.

queue   who is served next: classes by priority with aging, weighted fair queueing
        across tenants within a class, charged in estimated fleet work and corrected
        when the real cost is known.
"""
