def upper_names(names):
    result = []
    for n in names:
        result.append(n.upper())
    return result


def show(names):
    for n in upper_names(names):
        print n
