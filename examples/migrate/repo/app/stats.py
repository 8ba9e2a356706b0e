def mean(values):
    total = 0
    for v in values:
        total += v
    return total / float(len(values))


def report(values):
    print "mean:", mean(values)
