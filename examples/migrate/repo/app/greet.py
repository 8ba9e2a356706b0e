def greet(name):
    print "Hello, %s!" % name


if __name__ == "__main__":
    greet("world")
